"""`<state dir>/device.json`: who this installation is (`sdk-python-<6 hex>`) and who the hub says it is."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


@dataclass
class DeviceState:
    sdk_uuid: str
    device_id: Optional[str] = None
    sdk_token: Optional[str] = None


def load_state(state_dir: Path) -> DeviceState:
    """Reads the state, creating it on first use. A corrupt file is an error, not a silent reset: resetting
    would make this machine a new device and lose its token."""
    file = state_dir / "device.json"
    try:
        text = file.read_text("utf-8")
    except FileNotFoundError:
        fresh = DeviceState(sdk_uuid=f"sdk-python-{secrets.token_hex(3)}")
        save_state(state_dir, fresh)
        return fresh
    try:
        raw = json.loads(text)
        state = DeviceState(sdk_uuid=raw["sdk_uuid"], device_id=raw.get("device_id"), sdk_token=raw.get("sdk_token"))
        ok = isinstance(state.sdk_uuid, str) and 1 <= len(state.sdk_uuid) <= 128
        ok = ok and all(v is None or isinstance(v, str) for v in (state.device_id, state.sdk_token))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{file} is not a valid device state file; move it away to register as a new device")
    return state


def save_state(state_dir: Path, state: DeviceState) -> None:
    """Written atomically (temp file + rename), readable by the owner only: it holds the SDK token."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = state_dir / f"device.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fields = {k: v for k, v in asdict(state).items() if v is not None}
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(fields, indent=2) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, state_dir / "device.json")
