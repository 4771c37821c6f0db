"""The device protocol (docs/device-protocol.md, src/protocol/frames.ts): hub frames checked as the Node SDK's
zod schemas check them, device frames built, and the weights' binary layout (§6.4)."""
from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, Dict, Mapping, Optional

import numpy as np

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_BATCH_INPUTS = 4096
MAX_HEARTBEAT_LEASES = 256
FLOAT32_MAX = 3.4028234663852886e38
FORMATS = ("onnx", "torchscript")
LOG_LEVELS = ("debug", "info", "warn", "error")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")
SYNC_MODES = ("async", "semi_sync", "full_sync")

# Close codes (CLOSE in frames.ts) after which reconnecting cannot help.
CLOSE_UNSUPPORTED_PROTOCOL = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_REPLACED = 4409
FATAL_CLOSES = {
    CLOSE_UNAUTHORIZED: "the hub refused the enrollment token or secret, or the SDK token",
    CLOSE_FORBIDDEN: "the hub does not let this device in (banned, enrollment token revoked or expired, or instance type refused)",
    CLOSE_UNSUPPORTED_PROTOCOL: f"the hub does not speak protocol {PROTOCOL_VERSION}",
    CLOSE_REPLACED: "the same device connected from elsewhere (is another device using this state dir?)",
}

Frame = Dict[str, Any]


class FrameError(ValueError):
    """A hub frame that does not follow the protocol; the message names the field."""


def error_text(error: BaseException | str, limit: int = 4000) -> str:
    """An error as a device sends it: NUL replaced (the hub refuses frames holding one), at most `limit` chars."""
    return str(error).replace("\u0000", "\ufffd")[:limit]


# ---- checking hub frames ---------------------------------------------------------------------------------


def _field(frame: Mapping[str, Any], name: str, kind: type | tuple, optional: bool = False) -> Any:
    if name not in frame:
        if optional:
            return None
        raise FrameError(f"{name}: missing")
    value = frame[name]
    # bool is an int in Python; JSON's true is never a number
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise FrameError(f"{name}: expected {kind}, got a boolean")
    if not isinstance(value, kind):
        raise FrameError(f"{name}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _id(frame: Mapping[str, Any], name: str) -> str:
    value = _field(frame, name, str)
    if not 1 <= len(value) <= 128:
        raise FrameError(f"{name}: must be 1 to 128 characters")
    return value


def _int(frame: Mapping[str, Any], name: str, low: Optional[int] = None, optional: bool = False) -> Optional[int]:
    value = _field(frame, name, (int, float), optional)
    if value is None:
        return None
    if not float(value).is_integer():
        raise FrameError(f"{name}: expected an integer")
    if low is not None and value < low:
        raise FrameError(f"{name}: must be at least {low}")
    return int(value)


def _enum(frame: Mapping[str, Any], name: str, choices: tuple) -> str:
    value = _field(frame, name, str)
    if value not in choices:
        raise FrameError(f"{name}: must be one of {', '.join(choices)}")
    return value


def check_tensor(value: Any, where: str) -> Frame:
    if not isinstance(value, dict):
        raise FrameError(f"{where}: expected an object")
    data, shape = value.get("data"), value.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 16 or not all(_is_int(d) and d >= 0 for d in shape):
        raise FrameError(f"{where}.shape: expected 1 to 16 integers >= 0")
    if not isinstance(data, list) or len(data) > 16_000_000 or not all(_is_finite32(x) for x in data):
        raise FrameError(f"{where}.data: expected an array of finite float32 numbers")
    return {"data": data, "shape": [int(d) for d in shape]}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and float(x).is_integer()


def _is_finite32(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and -FLOAT32_MAX <= x <= FLOAT32_MAX


def _model(frame: Mapping[str, Any]) -> Frame:
    model = _field(frame, "model", dict)
    try:
        return {
            **model,
            "id": _id(model, "id"),
            "format": _enum(model, "format", FORMATS),
            "checksum": _field(model, "checksum", str),
            "download_path": _field(model, "download_path", str),
        }
    except FrameError as error:
        raise FrameError(f"model.{error}") from None


def _task(frame: Frame) -> Frame:
    _id(frame, "task_id"), _id(frame, "lease_id"), _field(frame, "lease_deadline", str)
    frame["model"] = _model(frame)
    if ("input" in frame) == ("inputs" in frame):
        raise FrameError("a task carries either input or inputs")
    if "input" in frame:
        frame["input"] = check_tensor(frame["input"], "input")
    else:
        inputs = _field(frame, "inputs", list)
        if not 1 <= len(inputs) <= MAX_BATCH_INPUTS:
            raise FrameError(f"inputs: 1 to {MAX_BATCH_INPUTS} tensors")
        frame["inputs"] = [check_tensor(t, f"inputs.{i}") for i, t in enumerate(inputs)]
    _field(frame, "input_name", str, optional=True)
    return frame


def _train_start(frame: Frame) -> Frame:
    _id(frame, "job_id"), _int(frame, "round", 0)
    frame["model"] = _model(frame)
    _field(frame, "weights", str, optional=True)
    config = _field(frame, "config", dict)
    _enum(config, "optimizer", OPTIMIZERS), _enum(config, "sync_mode", SYNC_MODES), _enum(config, "loss", LOSSES)
    if _field(config, "learning_rate", (int, float)) <= 0:
        raise FrameError("config.learning_rate: must be positive")
    _int(config, "batch_size", 1), _int(config, "local_steps", 1), _int(config, "sync_interval_ms", 1)
    data = _field(frame, "data", dict)
    kind = _enum(data, "type", ("stream", "dataset"))
    if kind == "stream":
        _int(data, "task_seed"), _int(data, "stream_seed")
        data.setdefault("clusters_per_class", 1)
        _int(data, "clusters_per_class", 1)
    else:
        _id(data, "dataset_id"), _field(data, "download_path", str), _field(data, "checksum", str), _enum(data, "format", ("csv", "jsonl"))
        _int(data, "split_seed"), _field(data, "validation_fraction", (int, float)), _int(data, "start", 0), _int(data, "end", 0)
    return frame


def _registered(f: Frame) -> Frame:
    _int(f, "protocol"), _id(f, "device_id"), _field(f, "sdk_token", str, True), _int(f, "heartbeat_interval_ms", 1)
    return f


def _cancel_task(f: Frame) -> Frame:
    _id(f, "task_id"), _id(f, "lease_id")
    return f


def _logs_request(f: Frame) -> Frame:
    _id(f, "request_id"), _int(f, "lines", 1), _enum(f, "level", ("all",) + LOG_LEVELS)
    if f["lines"] > 10_000:
        raise FrameError("lines: at most 10000")
    return f


def _error(f: Frame) -> Frame:
    _field(f, "code", str), _field(f, "message", str)
    return f


def _train_weights(f: Frame) -> Frame:
    _id(f, "job_id"), _int(f, "round", 0), _field(f, "weights", str)
    return f


def _train_stop(f: Frame) -> Frame:
    _id(f, "job_id"), _field(f, "reason", str)
    return f


_HUB_CHECKS = {
    "registered": _registered,
    "task": _task,
    "cancel_task": _cancel_task,
    "logs_request": _logs_request,
    "error": _error,
    "train_start": _train_start,
    "train_weights": _train_weights,
    "train_stop": _train_stop,
}


def parse_hub_frame(text: str | bytes) -> Frame:
    """A hub frame from its JSON text; FrameError when it is not one this SDK knows (the device logs and ignores it)."""
    if isinstance(text, bytes):
        raise FrameError("a binary frame")
    try:
        frame = json.loads(text)
    except ValueError:
        raise FrameError("not JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("not a JSON object")
    check = _HUB_CHECKS.get(frame.get("type"))  # type: ignore[arg-type]
    if check is None:
        raise FrameError(f"unknown frame type {json.dumps(frame.get('type'))}")
    return check(frame)


# ---- weights (§6.4) --------------------------------------------------------------------------------------

_MAGIC = b"DCPW"


def encode_weights(weights: Mapping[str, np.ndarray]) -> bytes:
    """Tensors sorted by name, float32 little-endian, after the DCPW header (as encodeWeights in fedavg.ts)."""
    names = sorted(weights)
    arrays = [np.ascontiguousarray(weights[name], dtype="<f4").reshape(-1) for name in names]
    header = json.dumps({"version": 1, "tensors": [{"name": n, "length": int(a.size)} for n, a in zip(names, arrays)]}, separators=(",", ":")).encode()
    padding = b"\0" * (-(8 + len(header)) % 4)
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, padding] + [a.tobytes() for a in arrays])


def decode_weights(data: bytes) -> Dict[str, np.ndarray]:
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ValueError('not dcp weights (no "DCPW" at the start)')
    (length,) = struct.unpack_from("<I", data, 4)
    if 8 + length > len(data):
        raise ValueError(f"header of {length} bytes runs past the end ({len(data)} bytes)")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    if header.get("version") != 1 or not isinstance(header.get("tensors"), list):
        raise ValueError("bad header")
    at = 8 + length + (-(8 + length) % 4)
    expected = at + 4 * sum(int(t["length"]) for t in header["tensors"])
    if len(data) != expected:
        raise ValueError(f"the header describes {expected} bytes, there are {len(data)}")
    weights: Dict[str, np.ndarray] = {}
    for tensor in header["tensors"]:
        name, count = tensor["name"], int(tensor["length"])
        if name in weights:
            raise ValueError(f"tensor {json.dumps(name)} appears twice")
        weights[name] = np.frombuffer(data, dtype="<f4", count=count, offset=at).astype(np.float32)
        at += 4 * count
    return weights


def weights_to_base64(weights: Mapping[str, np.ndarray]) -> str:
    return base64.b64encode(encode_weights(weights)).decode("ascii")


def weights_from_base64(text: str) -> Dict[str, np.ndarray]:
    return decode_weights(base64.b64decode(text, validate=True))


def dumps(frame: Frame) -> str:
    """A device frame as JSON text (NaN or Infinity, which JSON cannot carry, are refused here)."""
    return json.dumps(frame, separators=(",", ":"), allow_nan=False)

