"""What the device says about its machine: `hardware` in `register`, and the heartbeat's readings (§4.3)."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any, Dict, List

MIB = 1024 * 1024


def estimate_power_watts(cores: int, load: float, gpus: int = 0, gpu_busy: bool = False) -> float:
    """The Node SDK's formula (estimatePowerWatts), so that devices compare: idle 5 W + 1 W a core, peak
    8 W more a core (+150 W a GPU while a task runs on it), linear in the load."""
    load = min(1.0, max(0.0, load))
    idle = 5 + cores
    peak = idle + 8 * cores + (150 * gpus if gpu_busy else 0)
    return idle + (peak - idle) * load


def cores() -> int:
    return max(1, os.cpu_count() or 1)


def _meminfo() -> Dict[str, int]:
    info: Dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return info


def readings(gpus: int, gpu_busy: bool) -> Dict[str, float]:
    """load (1-minute load average / cores, at most 1), memory in use (total - free, MiB) and power."""
    n = cores()
    load = min(1.0, os.getloadavg()[0] / n) if hasattr(os, "getloadavg") else 0.0
    info = _meminfo()
    used = max(0, info.get("MemTotal", 0) - info.get("MemFree", 0)) / MIB
    return {"load": load, "memory_used_mb": used, "power_watts": estimate_power_watts(n, load, gpus, gpu_busy)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:256] or "unknown"
    except OSError:
        pass
    return (platform.processor() or "unknown")[:256]


def nvidia_gpus() -> List[Dict[str, Any]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=3, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts[0]:
            memory = float(parts[1]) if len(parts) > 1 and parts[1].replace(".", "", 1).isdigit() else 0
            gpus.append({"name": parts[0][:256], "memory_mb": max(0, round(memory))})
    return gpus[:64]


def describe_hardware(cuda: bool) -> Dict[str, Any]:
    """GPUs are listed (via nvidia-smi) only when the device runs on CUDA, as the Node SDK does."""
    total = _meminfo().get("MemTotal", 0)
    return {"cpu_model": cpu_model(), "cpu_cores": cores(), "memory_mb": max(1, round(total / MIB)), "gpus": nvidia_gpus() if cuda else []}
