"""The device's side of the protocol against a scripted hub (a real WebSocket server in the test): prefetched
tasks run in arrival order, cancel_task, heartbeats listing the leases held, a reconnect that comes back as
the same device with the lease it still holds, the new lease adopted, and a drain."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from websockets.asyncio.server import ServerConnection, serve

from conftest import linear_onnx
from dcp_device.device import Device, DeviceOptions


def model_ref(tmp_path: Path, state_dir: Path) -> Dict[str, Any]:
    """An ONNX model already in the device's cache (so the scripted hub serves no downloads)."""
    path = linear_onnx(tmp_path / "m.onnx", np.eye(2), np.ones(2))
    hex_ = hashlib.sha256(path.read_bytes()).hexdigest()
    (state_dir / "models").mkdir(parents=True)
    shutil.copy(path, state_dir / "models" / hex_)
    return {"id": "model_1", "format": "onnx", "checksum": f"sha256:{hex_}", "download_path": "/api/v1/sdk/models/model_1"}


def task(task_id: str, lease_id: str, model: Dict[str, Any], value: float) -> str:
    return json.dumps({"type": "task", "task_id": task_id, "lease_id": lease_id, "lease_deadline": "2030-01-01T00:00:00.000Z", "model": model, "input": {"data": [value, 0], "shape": [1, 2]}})


async def next_of(ws: ServerConnection, kind: str, seconds: float = 20) -> Dict[str, Any]:
    """The next frame of that type (heartbeats and others in between are skipped)."""
    async def read():
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame
    return await asyncio.wait_for(read(), seconds)


async def heartbeat_listing(ws: ServerConnection, leases: List[str]) -> Dict[str, Any]:
    while True:
        frame = await next_of(ws, "heartbeat")
        if frame["leases"] == leases:
            return frame


def run_with_hub(handler, options: Dict[str, Any], tmp_path: Path, prepare=None) -> None:
    async def main():
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            device = Device(DeviceOptions(server=f"ws://127.0.0.1:{port}", state_dir=tmp_path / "state", **options))
            if prepare:
                prepare(device)
            running = asyncio.ensure_future(device.run())
            await asyncio.wait_for(handler.done.wait(), 60)
            await device.stop(drain=True)
            await asyncio.wait_for(running, 10)
    asyncio.run(main())


def test_prefetched_tasks_run_in_arrival_order_and_a_cancelled_one_is_dropped(tmp_path: Path):
    model = model_ref(tmp_path, tmp_path / "state")
    seen: Dict[str, Any] = {}

    async def hub(ws: ServerConnection):
        register = json.loads(await ws.recv())
        seen["register"] = register
        await ws.send(json.dumps({"type": "registered", "protocol": 1, "device_id": "dev_1", "sdk_token": "dcp_s_1", "heartbeat_interval_ms": 100}))
        await heartbeat_listing(ws, [])
        for i in range(1, 5):
            await ws.send(task(f"t{i}", f"l{i}", model, i))
        await ws.send(json.dumps({"type": "cancel_task", "task_id": "t3", "lease_id": "l3"}))
        await ws.send(json.dumps({"type": "cancel_task", "task_id": "t4", "lease_id": "not-its-lease"}))
        results = [await next_of(ws, "task_result") for _ in range(3)]
        seen["results"] = results
        hub.done.set()
        seen["draining"] = await next_of(ws, "draining")
        try:
            await ws.recv()
        except Exception:
            seen["close"] = ws.close_code

    hub.done = asyncio.Event()
    run_with_hub(hub, {"max_tasks": 1}, tmp_path)
    assert seen["register"]["platform"] == "python" and "device_id" not in seen["register"]
    assert [(r["task_id"], r["lease_id"]) for r in seen["results"]] == [("t1", "l1"), ("t2", "l2"), ("t4", "l4")]
    assert [r["output"]["data"] for r in seen["results"]] == [[2, 1], [3, 1], [5, 1]]
    assert seen["close"] == 1000
    saved = json.loads((tmp_path / "state" / "device.json").read_text())
    assert (saved["device_id"], saved["sdk_token"]) == ("dev_1", "dcp_s_1")


def test_after_a_reconnect_it_comes_back_as_itself_with_the_lease_it_holds(tmp_path: Path):
    model = model_ref(tmp_path, tmp_path / "state")
    gate = asyncio.Event()
    seen: Dict[str, Any] = {"registers": []}

    async def hub(ws: ServerConnection):
        register = json.loads(await ws.recv())
        seen["registers"].append(register)
        first = len(seen["registers"]) == 1
        await ws.send(json.dumps({"type": "registered", "protocol": 1, "device_id": "dev_1", **({"sdk_token": "dcp_s_1"} if first else {}), "heartbeat_interval_ms": 100}))
        if first:
            await ws.send(task("t1", "l1", model, 1))
            await heartbeat_listing(ws, ["l1"])
            await ws.close(1001, "hub restarting")
            return
        # the first heartbeat on the new socket lists the lease it still holds
        seen["first_heartbeat"] = await next_of(ws, "heartbeat")
        await ws.send(task("t1", "l1-again", model, 1))  # the hub leased it again
        await heartbeat_listing(ws, ["l1-again"])
        gate.set()
        seen["result"] = await next_of(ws, "task_result")
        hub.done.set()
        await ws.wait_closed()

    hub.done = asyncio.Event()

    def slow_first_run(device: Device) -> None:
        real = device.models.runner

        async def gated(model, on_bytes):
            await gate.wait()
            return await real(model, on_bytes)

        device.models.runner = gated  # type: ignore[method-assign]

    run_with_hub(hub, {"max_tasks": 1}, tmp_path, prepare=slow_first_run)
    again = seen["registers"][1]
    assert (again["device_id"], again["sdk_token"]) == ("dev_1", "dcp_s_1")
    assert again["sdk_uuid"] == seen["registers"][0]["sdk_uuid"]
    assert seen["first_heartbeat"]["leases"] == ["l1"]
    assert (seen["result"]["task_id"], seen["result"]["lease_id"], seen["result"]["status"]) == ("t1", "l1-again", "completed")


def test_a_second_stop_during_a_drain_closes_at_once_dropping_what_runs(tmp_path: Path):
    model = model_ref(tmp_path, tmp_path / "state")
    gate = asyncio.Event()  # never opened: the task runs until the device stops
    seen: Dict[str, Any] = {}

    async def main():
        async def hub(ws: ServerConnection):
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "registered", "protocol": 1, "device_id": "dev_1", "sdk_token": "dcp_s_1", "heartbeat_interval_ms": 100}))
            await ws.send(task("t1", "l1", model, 1))
            await heartbeat_listing(ws, ["l1"])
            started.set()
            seen["draining"] = await next_of(ws, "draining")
            drained.set()
            frames = []
            try:
                async for message in ws:
                    frames.append(json.loads(message)["type"])
            finally:
                seen["after"], seen["close"] = frames, ws.close_code

        started, drained = asyncio.Event(), asyncio.Event()
        async with serve(hub, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            device = Device(DeviceOptions(server=f"ws://127.0.0.1:{port}", state_dir=tmp_path / "state", max_tasks=1))

            async def gated(model, on_bytes):
                await gate.wait()

            device.models.runner = gated  # type: ignore[method-assign]
            running = asyncio.ensure_future(device.run())
            await asyncio.wait_for(started.wait(), 30)
            first = asyncio.ensure_future(device.stop(drain=True))  # SIGTERM
            await asyncio.wait_for(drained.wait(), 10)
            await device.stop(drain=False)  # the second signal
            await asyncio.wait_for(asyncio.gather(first, running), 10)

    asyncio.run(main())
    assert seen["close"] == 1000
    assert "task_result" not in seen["after"]


def test_training_jobs_stopped_while_starting_never_train_and_late_weights_are_kept(tmp_path: Path):
    from conftest import mlp_torchscript
    from dcp_device.protocol import weights_from_base64, weights_to_base64

    path = mlp_torchscript(tmp_path / "m.pt")
    hex_ = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "state" / "models").mkdir(parents=True)
    shutil.copy(path, tmp_path / "state" / "models" / hex_)
    model = {"id": "model_ts", "format": "torchscript", "checksum": f"sha256:{hex_}", "download_path": "/api/v1/sdk/models/model_ts"}
    config = {"optimizer": "sgd", "learning_rate": 1e-9, "batch_size": 4, "local_steps": 2, "sync_mode": "full_sync", "sync_interval_ms": 60000, "loss": "cross_entropy"}
    data = {"type": "stream", "task_seed": 1, "stream_seed": 2}
    import torch

    round_two = {name: np.full(t.numel(), 0.5, dtype=np.float32) for name, t in torch.jit.load(str(path)).state_dict().items()}
    seen: Dict[str, Any] = {}

    async def hub(ws: ServerConnection):
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "registered", "protocol": 1, "device_id": "dev_1", "sdk_token": "dcp_s_1", "heartbeat_interval_ms": 100}))
        start = {"type": "train_start", "round": 0, "model": model, "config": config, "data": data}
        await ws.send(json.dumps({**start, "job_id": "train_a"}))
        await ws.send(json.dumps({"type": "train_stop", "job_id": "train_a", "reason": "paused"}))
        await ws.send(json.dumps({**start, "job_id": "train_b"}))
        await ws.send(json.dumps({"type": "train_weights", "job_id": "train_b", "round": 2, "weights": weights_to_base64(round_two)}))
        seen["update"] = await next_of(ws, "train_update")
        hub.done.set()
        await ws.wait_closed()

    hub.done = asyncio.Event()
    run_with_hub(hub, {}, tmp_path)
    update = seen["update"]
    assert (update["job_id"], update["base_round"]) == ("train_b", 2), "job a never trains; b starts from the round 2 weights that came while it was set up"
    for name, values in weights_from_base64(update["weights"]).items():
        np.testing.assert_allclose(values, round_two[name], atol=1e-6)
