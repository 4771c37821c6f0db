"""A dcp device (docs/device-protocol.md): connects to the hub, registers, heartbeats, runs the ONNX and
TorchScript tasks it is given, trains TorchScript models in federated jobs, drains on request."""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from . import __version__
from .jobs import TrainingJobs
from .log import DeviceLog, Sink
from .machine import describe_hardware, readings
from .models import ModelStore
from .protocol import FATAL_CLOSES, MAX_FRAME_BYTES, MAX_HEARTBEAT_LEASES, PROTOCOL_VERSION, Frame, FrameError, dumps, parse_hub_frame
from .runners import torch_available
from .state import DeviceState, load_state, save_state
from .tasks import HeldTasks, Meters, run_task

#: A silent socket is declared dead after this long (at least three heartbeat intervals).
MIN_DEAD_AFTER_S = 10.0


class DeviceRefused(Exception):
    """The hub refused the device for good (4400, 4401, 4403, 4409): reconnecting cannot help."""


@dataclass
class DeviceOptions:
    #: Hub base URL: `http(s)://host:port` or `ws(s)://host:port`.
    server: str
    #: Where device.json (device id, SDK token, SDK UUID) lives; model files go to `<state_dir>/models`.
    state_dir: Path = field(default_factory=lambda: Path.home() / ".dcp-device")
    instance_type: str = "user"
    enrollment_token: Optional[str] = None
    enrollment_secret: Optional[str] = None
    #: Tasks run at once (the hub may send up to its prefetch times as many; the rest wait in arrival order). Default 4.
    max_tasks: int = 4
    #: Threads one task's run may use (onnxruntime intra-op, torch.set_num_threads). Default: cores / max_tasks.
    threads: Optional[int] = None
    max_batch_inputs: int = 1024
    can_train: bool = True
    #: Run on CUDA when present (onnxruntime's CUDA provider, torch on cuda); else CPU. Default False.
    cuda: bool = False
    log: Optional[Sink] = None


def endpoints(server: str) -> tuple[str, str]:
    """(HTTP base URL, socket URL) from `http(s)://` or `ws(s)://host:port`."""
    parts = urlsplit(server.rstrip("/"))
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"server must be an http(s) or ws(s) URL, got {server!r}")
    path = parts.path.removesuffix("/api/v1/devices/connect").rstrip("/")
    base = urlunsplit((scheme, parts.netloc, path, "", ""))
    return base, urlunsplit(("wss" if scheme == "https" else "ws", parts.netloc, f"{path}/api/v1/devices/connect", "", ""))


def backoff_delay(attempt: int) -> float:
    """250 ms doubling to 10 s, the upper half jittered (as the Node SDK), in seconds."""
    ceiling = min(10_000, 250 * 2 ** min(attempt, 16))
    return (ceiling / 2 + random.random() * ceiling / 2) / 1000


class Device:
    def __init__(self, options: DeviceOptions) -> None:
        self.options = options
        self.base, self.socket_url = endpoints(options.server)
        if not 1 <= options.max_tasks <= 256:
            raise ValueError("max_tasks must be 1..256")
        threads = options.threads or max(1, (os.cpu_count() or 1) // options.max_tasks)
        self.log = DeviceLog(options.log)
        self.models = ModelStore(self.base, options.state_dir / "models", lambda: self.state.sdk_token if self.state else None, self.log, threads, options.cuda)
        self.formats = ["onnx", "torchscript"] if torch_available() else ["onnx"]
        self.meters = Meters()
        self.tasks: Optional[HeldTasks] = None
        self.state: Optional[DeviceState] = None
        self.hardware: Dict[str, Any] = {}
        self.phase = "idle"  # idle, running, draining, stopped
        self.ws: Optional[ClientConnection] = None
        self.registered = asyncio.Event()
        self.outbox: List[Frame] = []
        self.jobs = TrainingJobs(self.models, self.send, self.log, options.cuda)
        self.last_heard = 0.0
        self._stopped = asyncio.Event()
        self._cut_short = asyncio.Event()
        self._writes: set[asyncio.Task] = set()

    @property
    def device_id(self) -> Optional[str]:
        return self.state.device_id if self.state else None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connects and serves until stop(); raises DeviceRefused when the hub refuses it for good."""
        if self.phase != "idle":
            raise RuntimeError("Device.run() can be called once, before stop()")
        self.phase = "running"
        self.tasks = HeldTasks(self.options.max_tasks, lambda task: run_task(task, self.models.runner, self.meters), self._finish_task)
        self.state = await asyncio.to_thread(load_state, self.options.state_dir)
        self.hardware = await asyncio.to_thread(describe_hardware, self.options.cuda)
        attempt = 0
        while self.phase != "stopped":
            code, reason = await self._session()
            if self.phase == "stopped":
                break
            if code in FATAL_CLOSES:
                self.phase = "stopped"
                self.tasks.halt()
                self.log.error(f"giving up: {FATAL_CLOSES[code]} (code {code}: {reason})")
                raise DeviceRefused(f"{FATAL_CLOSES[code]} (code {code}: {reason})")
            attempt = 0 if self.registered.is_set() else attempt + 1
            self.registered.clear()
            delay = backoff_delay(attempt)
            self.log.warn(f"disconnected (code {code}{': ' + reason if reason else ''}); reconnecting in {delay * 1000:.0f} ms")
            try:
                await asyncio.wait_for(self._stopped.wait(), delay)
            except asyncio.TimeoutError:
                pass
        self.log.info("stopped")

    async def stop(self, drain: bool = True) -> None:
        """drain: tell the hub, take nothing new, finish every task held and send the results, then close.
        Otherwise (or a second call during a drain) close at once, dropping what is still held."""
        if not drain:
            self._cut_short.set()
        if self.phase in ("stopped", "draining"):
            return
        if drain and self.phase == "running" and self.tasks is not None:
            self.phase = "draining"
            self.log.info(f"draining: finishing {len(self.tasks)} task(s), taking no new ones")
            self.send({"type": "draining"})
            self.jobs.stop_all("draining")
            empty = asyncio.ensure_future(self.tasks.when_empty())
            cut = asyncio.ensure_future(self._cut_short.wait())
            await asyncio.wait([empty, cut], return_when=asyncio.FIRST_COMPLETED)
            empty.cancel(), cut.cancel()
        self.phase = "stopped"
        if self.tasks:
            self.tasks.halt()
        self.jobs.stop_all("the device stopped")
        self._stopped.set()
        if self._writes:  # the last results leave before the close frame
            await asyncio.wait(self._writes, timeout=5)
        if self.ws is not None:
            await self.ws.close(1000, "device stopped")

    # ---- connection --------------------------------------------------------------------------------------

    async def _session(self) -> tuple[int, str]:
        """One connection, from open to close: (close code, reason)."""
        self.log.info(f"connecting to {self.socket_url}")
        try:
            ws = await connect(self.socket_url, max_size=MAX_FRAME_BYTES, ping_interval=None, compression=None, open_timeout=10)
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as error:
            return 1006, str(error)
        if self.phase == "stopped":  # stopped while connecting
            await ws.close(1000, "device stopped")
            return 1000, "device stopped"
        self.ws = ws
        self.last_heard = time.monotonic()
        heartbeat: Optional[asyncio.Task] = None
        try:
            await ws.send(dumps(self._register_frame()))
            async for message in ws:
                self.last_heard = time.monotonic()
                interval = self._on_message(message)
                if interval is not None:
                    if heartbeat:
                        heartbeat.cancel()
                    heartbeat = asyncio.ensure_future(self._heartbeats(interval))
        except ConnectionClosed:
            pass
        finally:
            if heartbeat:
                heartbeat.cancel()
            self.ws = None
            # the hub released this device from its jobs when the socket went
            self.jobs.stop_all("disconnected")
        received = ws.close_code if ws.close_code is not None else 1006
        return received, ws.close_reason or ""

    def send(self, frame: Frame) -> bool:
        """False when the frame cannot go now: no open socket, or (for anything but register) not registered."""
        ws = self.ws
        if ws is None or not self.registered.is_set():
            return False
        text = dumps(frame)

        async def write() -> None:
            try:
                await ws.send(text)
            except ConnectionClosed:
                if frame["type"] == "task_result":
                    self.outbox.append(frame)  # sent once registered again
        writing = asyncio.ensure_future(write())
        self._writes.add(writing)
        writing.add_done_callback(self._writes.discard)
        return True

    def _register_frame(self) -> Frame:
        state, options = self.state, self.options
        assert state is not None
        frame: Frame = {"type": "register", "protocol": PROTOCOL_VERSION}
        if options.enrollment_token:
            frame["enrollment_token"] = options.enrollment_token
        if options.enrollment_secret:
            frame["enrollment_secret"] = options.enrollment_secret
        if state.device_id and state.sdk_token:
            frame.update(device_id=state.device_id, sdk_token=state.sdk_token)
        gpu = options.cuda and bool(self.hardware.get("gpus"))
        can_train = options.can_train and "torchscript" in self.formats
        frame.update(
            platform="python", sdk_version=__version__, sdk_uuid=state.sdk_uuid, instance_type=options.instance_type, hardware=self.hardware,
            # it trains TorchScript models only (ONNX training stays on Node devices): `train_formats` says so
            capabilities={"formats": self.formats, "gpu": gpu, "can_train": can_train,
                          **({"train_formats": ["torchscript"]} if can_train else {}),
                          "max_concurrent_tasks": options.max_tasks, "max_batch_inputs": options.max_batch_inputs},
        )
        return frame

    async def _heartbeats(self, interval_ms: int) -> None:
        interval = interval_ms / 1000
        while self.ws is not None:
            if time.monotonic() - self.last_heard > max(3 * interval, MIN_DEAD_AFTER_S):
                self.log.warn("the hub stopped answering pings; reconnecting")
                self.ws.transport.abort()
                return
            try:
                pong = await self.ws.ping()
                pong.add_done_callback(lambda _: setattr(self, "last_heard", time.monotonic()))
            except ConnectionClosed:
                return
            self.send(self._heartbeat_frame())
            await asyncio.sleep(interval)

    def _heartbeat_frame(self) -> Frame:
        # every lease held: running, queued, or done with a result not sent yet
        leases = (self.tasks.leases() if self.tasks else []) + [r["lease_id"] for r in self.outbox]
        gpus = max(1, len(self.hardware.get("gpus", []))) if self.options.cuda else 0
        return {"type": "heartbeat", **readings(gpus, self.meters.gpu_runs > 0), "leases": leases[:MAX_HEARTBEAT_LEASES]}

    # ---- hub frames --------------------------------------------------------------------------------------

    def _on_message(self, message: str | bytes) -> Optional[int]:
        """Handles one hub frame; returns the heartbeat interval on `registered`."""
        try:
            frame = parse_hub_frame(message)
        except FrameError as error:
            self.log.warn(f"ignored a frame from the hub: {error}")
            return None
        kind = frame["type"]
        if kind == "registered":
            self._on_registered(frame)
            return frame["heartbeat_interval_ms"]
        if kind == "task":
            self._on_task(frame)
        elif kind == "cancel_task":
            if self.tasks and self.tasks.cancel(frame["task_id"], frame["lease_id"]):
                self.log.info(f"task {frame['task_id']} cancelled by the hub")
        elif kind == "logs_request":
            self.send({"type": "logs", "request_id": frame["request_id"], "lines": self.log.tail(frame["lines"], frame["level"])})
        elif kind == "error":
            self.log.error(f"hub error {frame['code']}: {frame['message']}")
        elif kind == "train_start":
            if self.phase == "running":
                self.jobs.start(frame)
            else:
                self.log.warn(f"ignored training job {frame['job_id']}: the device is {self.phase}")
        elif kind == "train_weights":
            self.jobs.weights(frame)
        elif kind == "train_stop":
            self.jobs.stop(frame["job_id"], frame["reason"])
        return None

    def _on_registered(self, frame: Frame) -> None:
        before = self.state
        assert before is not None
        same = before.device_id == frame["device_id"]
        # a new identity without a token: the old token belongs to another device
        self.state = DeviceState(before.sdk_uuid, frame["device_id"], frame.get("sdk_token") or (before.sdk_token if same else None))
        self.registered.set()
        self.log.info(f"registered as {frame['device_id']} (protocol {frame['protocol']}, heartbeat every {frame['heartbeat_interval_ms']} ms)")
        if self.state != before:
            try:
                save_state(self.options.state_dir, self.state)
            except OSError as error:
                self.log.error(f"cannot save the device state: {error}")
        if self.phase == "draining":
            self.send({"type": "draining"})
        pending, self.outbox = self.outbox, []
        for result in pending:
            self.send(result)

    # ---- tasks -------------------------------------------------------------------------------------------

    def _on_task(self, task: Frame) -> None:
        assert self.tasks is not None
        if self.phase != "running":
            return self.log.warn(f"ignored task {task['task_id']}: the device is {self.phase}")
        if self.tasks.adopt(task):
            return self.log.info(f"task {task['task_id']} is held already: now under lease {task['lease_id']}")
        if self.tasks.has(task["task_id"]):
            return None
        self.log.info(f"task {task['task_id']} received (model {task['model']['id']}, lease {task['lease_id']})")
        self.tasks.add(task)

    def _finish_task(self, task: Frame, result: Frame, cancelled: bool) -> None:
        task_id = task["task_id"]
        if cancelled:
            return self.log.info(f"task {task_id} ended after being cancelled; result dropped")
        if self.phase == "stopped":
            return self.log.warn(f"task {task_id} ended after the device stopped; result dropped")
        if result["status"] == "completed":
            self.log.info(f"task {task_id} completed (cpu {result['metrics']['cpu_ms']:.2f} ms)")
        else:
            self.log.warn(f"task {task_id} failed: {result['error']}")
        if len(dumps(result)) > MAX_FRAME_BYTES - 1024:
            result = {k: v for k, v in result.items() if k not in ("output", "outputs")}
            result.update(status="failed", error="the output is too large for one frame")
        if not self.send(result):
            self.outbox.append(result)
