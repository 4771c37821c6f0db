"""`python -m dcp_device --server ws://host:3000`: turns this machine into a dcp device. SIGINT / SIGTERM
drains (finishes the tasks it holds); a second signal stops at once. Exit 0 when stopped by a signal (or, run
by `dcp start`, when that process is gone), 1 when the hub refused it, 2 on a usage error."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional

from . import __version__
from .device import Device, DeviceOptions, DeviceRefused


def _whole(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcp_device", description="A dcp device: runs ONNX and TorchScript tasks, trains TorchScript models (flags as `dcp worker`).")
    p.add_argument("--server", default=os.environ.get("DCP_SERVER"), help="hub URL, http(s):// or ws(s)://host:port (default $DCP_SERVER)")
    p.add_argument("--instance-type", choices=["user", "aws"], default="user", help="the instance type the enrollment token was issued for (default user)")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".dcp-device", help="where device.json and the model cache live (default ~/.dcp-device)")
    p.add_argument("--max-tasks", type=_whole(1, 256), default=4, help="tasks run at once; the rest wait in arrival order (default 4)")
    p.add_argument("--threads", type=_whole(1, 256), help="threads per task (default: cores / max-tasks)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: run on the GPU when one is present (default cpu)")
    p.add_argument("--no-train", action="store_true", help="do not offer this device for federated training")
    p.add_argument("--enrollment-token", default=os.environ.get("DCP_ENROLLMENT_TOKEN"), help="enrollment token dcp_e_... (default $DCP_ENROLLMENT_TOKEN)")
    p.add_argument("--enrollment-secret", default=os.environ.get("DCP_ENROLLMENT_SECRET"), help="enrollment secret (default $DCP_ENROLLMENT_SECRET)")
    p.add_argument("--verbose", action="store_true", help="print every log line (default: warnings and errors)")
    p.add_argument("--version", action="version", version=f"dcp-device {__version__}")
    return p


#: Set by `dcp start` for the devices it runs, with a pipe as stdin: the pipe closes when that process dies
#: (even by SIGKILL), and the device stops instead of reconnecting to nothing forever.
PARENT_PIPE = "DCP_DEVICE_PARENT_PIPE"


def watch_parent(loop: asyncio.AbstractEventLoop, device: Device, gone: Callable[[], None]) -> None:
    fd = sys.stdin.fileno()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if data:
            return  # the parent writes nothing; whatever comes is ignored
        loop.remove_reader(fd)
        print("dcp-device: the server that started it is gone, stopping", file=sys.stderr, flush=True)
        gone()
        asyncio.ensure_future(device.stop(drain=False))

    loop.add_reader(fd, on_readable)


async def serve(device: Device) -> int:
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(name: str) -> None:
        nonlocal signals
        signals += 1
        print(f"dcp-device: {name}, {'draining (again to stop at once)' if signals == 1 else 'stopping now'}", file=sys.stderr, flush=True)
        asyncio.ensure_future(device.stop(drain=signals == 1))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    orphaned = False

    def on_parent_gone() -> None:
        nonlocal orphaned
        orphaned = True

    if os.environ.get(PARENT_PIPE) == "1":
        watch_parent(loop, device, on_parent_gone)
    try:
        await device.run()
        if signals > 1 or orphaned:
            # stop at once: a model run still in a worker thread would hold up the interpreter's exit
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(0)
        return 0
    except DeviceRefused as error:
        print(f"dcp-device: {error}", file=sys.stderr)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.server:
        parser().error("--server <url> is required (or DCP_SERVER)")
    verbose = args.verbose

    def sink(line) -> None:
        if verbose or line["level"] in ("warn", "error"):
            print(f"{line['ts']} {line['level']} {line['message']}", file=sys.stderr, flush=True)
        if line["message"].startswith("registered as "):
            print(f"dcp-device: {line['message']}", flush=True)

    try:
        options = DeviceOptions(
            server=args.server, state_dir=args.state_dir.resolve(), instance_type=args.instance_type, enrollment_token=args.enrollment_token,
            enrollment_secret=args.enrollment_secret, max_tasks=args.max_tasks, threads=args.threads, can_train=not args.no_train,
            cuda=args.device == "cuda", log=sink,
        )
        device = Device(options)
    except ValueError as error:
        parser().error(str(error))
    return asyncio.run(serve(device))


if __name__ == "__main__":
    sys.exit(main())
