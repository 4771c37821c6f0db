"""One device's part of a federated training job (§6.6): train `local_steps` batches from the job's weights,
send `train_update`, and go on from the weights the hub sends back. The steps run in a worker thread, so the
event loop keeps heartbeating and reading frames meanwhile."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable, Optional

from .protocol import Frame, error_text, weights_from_base64, weights_to_base64
from .synthetic import SyntheticTask, mix_seeds

#: Async mode: how long to wait for the mixed weights after an update before training on from its own.
ASYNC_REPLY_WAIT_S = 2.0


async def open_session(frame: Frame, model_path: Path, dataset: Optional[bytes], send: Callable[[Frame], bool], power_watts: Callable[[], float], log, device: str = "cpu") -> "TrainingSession":
    """Loads the model (in a thread: torch.jit.load takes a while) and starts training."""
    from .trainer import TorchTrainable

    if frame["model"]["format"] != "torchscript":
        raise ValueError(f"this device trains TorchScript models only; {frame['model']['format']} models train on Node devices")

    def load():
        model = TorchTrainable(model_path, device, input_size=_features(frame["model"].get("input_shape")))
        if frame.get("weights"):
            model.set_weights(weights_from_base64(frame["weights"]))
        return model

    return TrainingSession(frame, await asyncio.to_thread(load), dataset, send, power_watts, log)


class TrainingSession:
    def __init__(self, frame: Frame, model, dataset: Optional[bytes], send: Callable[[Frame], bool], power_watts: Callable[[], float], log) -> None:
        self.job_id: str = frame["job_id"]
        self.frame = frame
        self.send = send
        self.power_watts = power_watts
        self.log = log
        self.model = model
        self.base_round: int = frame["round"]
        self.latest: Optional[Frame] = None
        self.stopped = False
        self._wake = asyncio.Event()
        self.batches = self._batches(dataset)
        self.finished = asyncio.ensure_future(self._guarded())

    def _batches(self, dataset: Optional[bytes]):
        data, loss = self.frame["data"], self.frame["config"]["loss"]
        if data["type"] == "dataset":
            from .datasets import DatasetBatches

            if dataset is None:
                raise ValueError("a dataset job without its dataset")
            return DatasetBatches(dataset, data, loss)
        kind = "regression" if loss == "mse" else "classification"
        task = SyntheticTask(self.model.input_size, self.model.output_size, data["task_seed"], kind, data.get("clusters_per_class", 1))
        counter = iter(range(1 << 62))
        return _Stream(lambda size: task.sample(size, mix_seeds(data["stream_seed"], next(counter))))

    def weights(self, frame: Frame) -> None:
        """New weights from the hub: the next local round starts from them."""
        if self.latest is None or frame["round"] >= self.latest["round"]:
            self.latest = frame
        self._wake.set()

    def stop(self) -> None:
        self.stopped = True
        self._wake.set()

    async def _guarded(self) -> None:
        try:
            await self._run()
        except Exception as error:
            self.log.warn(f"training job {self.job_id} stopped: {error}")
            if not self.stopped:
                self.send({"type": "train_error", "job_id": self.job_id, "error": error_text(error)})
            self.stop()

    async def _run(self) -> None:
        from .trainer import create_optimizer

        config = self.frame["config"]
        sync = config["sync_mode"] != "async"
        pull = asyncio.ensure_future(self._pull(config["sync_interval_ms"] / 1000)) if not sync else None
        optimizer = create_optimizer(config["optimizer"], config["learning_rate"], self.model.parameters())
        try:
            while not self.stopped:
                if self._adopt_latest():  # Adam's state restarts when the weights are replaced
                    optimizer = create_optimizer(config["optimizer"], config["learning_rate"], self.model.parameters())
                cpu_before, started = time.process_time(), time.perf_counter()
                loss_sum, steps = await asyncio.to_thread(self._steps, optimizer, config["local_steps"], config["batch_size"], config["loss"])
                if self.stopped or steps == 0:
                    return
                self.send({
                    "type": "train_update", "job_id": self.job_id, "base_round": self.base_round,
                    "weights": weights_to_base64(self.model.get_weights()),
                    "samples": steps * config["batch_size"], "steps": steps, "loss": loss_sum / steps,
                    "metrics": {"cpu_ms": (time.process_time() - cpu_before) * 1000, "gpu_ms": 0.0 if self.model.device.type == "cpu" else (time.perf_counter() - started) * 1000, "wall_ms": (time.perf_counter() - started) * 1000},
                    "power_watts": self.power_watts(),
                })
                await self._until_newer_round(None if sync else ASYNC_REPLY_WAIT_S)
                if not sync:  # the hub refuses updates closer together than sync_interval_ms / 10
                    await self._pause(config["sync_interval_ms"] // 10 / 1000)
        finally:
            if pull:
                pull.cancel()

    def _steps(self, optimizer, count: int, batch_size: int, loss: str):
        total, steps = 0.0, 0
        while steps < count and not self.stopped:
            x, labels = self.batches.next(batch_size)
            total += self.model.train_step(optimizer, x, labels, loss)
            steps += 1
        return total, steps

    def _adopt_latest(self) -> bool:
        latest = self.latest
        if latest is None or latest["round"] < self.base_round:
            return False
        self.latest = None
        self.model.set_weights(weights_from_base64(latest["weights"]))
        self.base_round = latest["round"]
        return True

    async def _until_newer_round(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopped and not (self.latest and self.latest["round"] > self.base_round):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopped and time.monotonic() < end:
            await asyncio.sleep(min(0.05, end - time.monotonic()))

    async def _pull(self, interval: float) -> None:
        while not self.stopped:
            await asyncio.sleep(interval)
            self.send({"type": "weights_request", "job_id": self.job_id})


class _Stream:
    def __init__(self, draw) -> None:
        self.next = draw


def _features(shape) -> Optional[int]:
    """Floats per sample of an `input_shape` the hub may send (`[-1, 4]` -> 4)."""
    if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    total = 1
    for d in shape[1:]:
        total *= d
    return total
