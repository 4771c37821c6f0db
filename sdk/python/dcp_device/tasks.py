"""Tasks a device holds (§5): at most `max` running, the rest queued in arrival order; each run metered and
answered with one `task_result`."""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Awaitable, Callable, Dict, List

from .protocol import FLOAT32_MAX, Frame, error_text
from .runners import Runner

FLOAT_BYTES = 4


class SharedMeter:
    """Shares a clock's time between the runs in progress: between two consecutive starts or ends, the time
    that passed is split equally between the runs that were in progress (as the Node SDK's SharedMeter), so
    runs side by side together bill the clock once."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.last = read()
        self.shares: Dict[int, float] = {}
        self.next_id = 0

    def start(self) -> int:
        self._advance()
        self.next_id += 1
        self.shares[self.next_id] = 0.0
        return self.next_id

    def stop(self, handle: int) -> float:
        self._advance()
        return self.shares.pop(handle, 0.0)

    def _advance(self) -> None:
        now = self.read()
        elapsed, self.last = now - self.last, now
        if self.shares and elapsed > 0:
            each = elapsed / len(self.shares)
            for handle in self.shares:
                self.shares[handle] += each


def process_cpu_ms() -> float:
    """The process's CPU time (user and system, every thread: onnxruntime's and torch's included), ms."""
    return time.process_time() * 1000


class Meters:
    def __init__(self) -> None:
        self.cpu = SharedMeter(process_cpu_ms)
        self.gpu = SharedMeter(lambda: time.perf_counter() * 1000)
        self.gpu_runs = 0


async def run_task(task: Frame, load: Callable[[Frame, Callable[[int], None]], Awaitable[Runner]], meters: Meters) -> Frame:
    """Runs one task and returns its `task_result`; never raises: a failure is a `failed` result with the
    metrics measured until then."""
    inputs = task.get("inputs") or [task["input"]]
    metrics = {"cpu_ms": 0.0, "gpu_ms": 0.0, "bytes_in": FLOAT_BYTES * sum(len(t["data"]) for t in inputs), "bytes_out": 0}
    base = {"type": "task_result", "task_id": task["task_id"], "lease_id": task["lease_id"]}

    def on_bytes(n: int) -> None:
        metrics["bytes_in"] += n

    try:
        runner = await load(task["model"], on_bytes)
        cpu = meters.cpu.start()
        gpu = meters.gpu.start() if runner.gpu else None
        meters.gpu_runs += runner.gpu
        try:
            outputs = await asyncio.to_thread(runner.run_all, inputs, task.get("input_name"))
        finally:
            meters.gpu_runs -= runner.gpu
            metrics["cpu_ms"] = meters.cpu.stop(cpu)
            metrics["gpu_ms"] = meters.gpu.stop(gpu) if gpu is not None else 0.0
        _check_finite(outputs)
        metrics["bytes_out"] = FLOAT_BYTES * sum(len(t["data"]) for t in outputs)
        result = {"outputs": outputs} if "inputs" in task else {"output": outputs[0]}
        return {**base, "status": "completed", **result, "metrics": metrics}
    except Exception as error:  # any failure is the task's, reported to the hub
        return {**base, "status": "failed", "error": error_text(error, 4096) or "task failed", "metrics": metrics}


def _check_finite(outputs: List[Frame]) -> None:
    """JSON carries no NaN or Infinity (the hub would refuse the frame): such an output fails the task, saying where."""
    for i, output in enumerate(outputs):
        for j, value in enumerate(output["data"]):
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise ValueError(f"output {i}: value {j} is {value} (NaN, Infinity or beyond float32 on the device)")


class HeldTasks:
    """The tasks the device holds, by task id. A cancelled task leaves the lease list at once; if it runs,
    it keeps its slot until the run returns (a run cannot be interrupted) and its result is dropped."""

    def __init__(self, max_running: int, run: Callable[[Frame], Awaitable[Frame]], done: Callable[[Frame, Frame, bool], None]) -> None:
        self.max = max_running
        self.run = run
        self.done = done
        self.held: Dict[str, Dict[str, Any]] = {}
        self.queue: List[str] = []
        self.running = 0
        self.halted = False
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self.held)

    def has(self, task_id: str) -> bool:
        return task_id in self.held

    def add(self, task: Frame) -> None:
        self.held[task["task_id"]] = {"task": task, "running": False, "cancelled": False}
        self.queue.append(task["task_id"])
        self._pump()

    def adopt(self, task: Frame) -> bool:
        """The hub leased a held task again under a new lease (after a reconnect): held under it from now on."""
        held = self.held.get(task["task_id"])
        if not held or held["cancelled"] or held["task"]["lease_id"] == task["lease_id"]:
            return False
        held["task"] = task
        return True

    def cancel(self, task_id: str, lease_id: str) -> bool:
        held = self.held.get(task_id)
        if not held or held["task"]["lease_id"] != lease_id or held["cancelled"]:
            return False
        if held["running"]:
            held["cancelled"] = True
        else:
            del self.held[task_id]
            self.queue.remove(task_id)
            self._notify()
        return True

    def leases(self) -> List[str]:
        return [h["task"]["lease_id"] for h in self.held.values() if not h["cancelled"]]

    def halt(self) -> None:
        """Starts nothing more (queued tasks stay unstarted)."""
        self.halted = True
        self._notify()

    async def when_empty(self) -> None:
        """Every held task has ended (after halt(), every running one)."""
        while self.held and not (self.halted and self.running == 0):
            self._changed.clear()
            await self._changed.wait()

    def _pump(self) -> None:
        while not self.halted and self.running < self.max and self.queue:
            held = self.held.get(self.queue.pop(0))
            if held:
                held["running"] = True
                self.running += 1
                asyncio.ensure_future(self._start(held))

    async def _start(self, held: Dict[str, Any]) -> None:
        result = await self.run(held["task"])
        self.running -= 1
        self.held.pop(held["task"]["task_id"], None)
        # under the lease it is held under now (adopt may have changed it while it ran)
        self.done(held["task"], {**result, "lease_id": held["task"]["lease_id"]}, held["cancelled"])
        self._pump()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
