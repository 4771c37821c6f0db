"""The device's log lines, kept in a ring buffer for the hub's `logs_request` (§7), and passed to a sink."""
from __future__ import annotations

import collections
from datetime import datetime, timezone
from typing import Callable, Deque, Dict, List, Optional

from .protocol import LOG_LEVELS, MAX_FRAME_BYTES, dumps

Line = Dict[str, str]
Sink = Callable[[Line], None]
MAX_MESSAGE = 8192


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DeviceLog:
    """`capacity`: lines kept, default 2,000 (as the Node SDK)."""

    def __init__(self, sink: Optional[Sink] = None, capacity: int = 2000) -> None:
        self.lines: Deque[Line] = collections.deque(maxlen=capacity)
        self.sink = sink

    def debug(self, message: str) -> None:
        self.write("debug", message)

    def info(self, message: str) -> None:
        self.write("info", message)

    def warn(self, message: str) -> None:
        self.write("warn", message)

    def error(self, message: str) -> None:
        self.write("error", message)

    def write(self, level: str, message: str) -> None:
        line = {"ts": iso_now(), "level": level, "message": message[:MAX_MESSAGE]}
        self.lines.append(line)
        if self.sink:
            try:
                self.sink(line)
            except Exception:  # a failing sink must not take the device down; the line is kept
                pass

    def tail(self, count: int, level: str) -> List[Line]:
        """The last `count` lines at `level` or above ('all': every line), oldest first, that fit in one frame."""
        lowest = 0 if level == "all" else LOG_LEVELS.index(level)
        matching = [line for line in self.lines if LOG_LEVELS.index(line["level"]) >= lowest][-count:]
        while matching and len(dumps({"lines": matching})) > MAX_FRAME_BYTES - 1024:
            matching = matching[max(1, len(matching) // 10) :]
        return matching
