"""The federated training jobs a device works for (§6.1): a `train_start` opens a session (model and dataset
downloaded first), `train_weights` reach it, `train_stop`, a drain or a disconnect end it."""
from __future__ import annotations

import asyncio
from typing import Callable, Dict, Optional

from .log import DeviceLog
from .machine import readings
from .models import ModelStore
from .protocol import Frame, error_text
from .training import TrainingSession, open_session


class TrainingJobs:
    def __init__(self, models: ModelStore, send: Callable[[Frame], bool], log: DeviceLog, cuda: bool) -> None:
        self.models = models
        self.send = send
        self.log = log
        self.cuda = cuda
        self.sessions: Dict[str, TrainingSession] = {}
        # Jobs whose session is being set up, with the newest weights that came meanwhile: the hub may send a
        # train_start again right before a round's train_weights, which the new session must not miss.
        self.starting: Dict[str, Dict[str, Optional[Frame]]] = {}

    def start(self, frame: Frame) -> None:
        """Joins the job. Recorded as starting at once, so that a train_stop or train_weights that comes
        while the model downloads finds it."""
        job_id = frame["job_id"]
        self.stop(job_id, "started again")
        self.log.info(f"training job {job_id}: joining at round {frame['round']}")
        holder: Dict[str, Optional[Frame]] = {"weights": None}
        self.starting[job_id] = holder
        asyncio.ensure_future(self._start(frame, holder))

    def weights(self, frame: Frame) -> None:
        holder = self.starting.get(frame["job_id"])
        if holder is not None and (holder["weights"] is None or frame["round"] >= holder["weights"]["round"]):
            holder["weights"] = frame
        session = self.sessions.get(frame["job_id"])
        if session:
            session.weights(frame)

    def stop(self, job_id: str, reason: str) -> None:
        starting = self.starting.pop(job_id, None)
        session = self.sessions.pop(job_id, None)
        if session is not None or starting is not None:
            self.log.info(f"training job {job_id}: leaving ({reason})")
        if session is not None:
            session.stop()

    def stop_all(self, reason: str) -> None:
        for job_id in list(self.sessions) + list(self.starting):
            self.stop(job_id, reason)

    async def _start(self, frame: Frame, holder: Dict[str, Optional[Frame]]) -> None:
        job_id = frame["job_id"]
        try:
            session = await self._open(frame, holder)
        except Exception as error:
            if self.starting.get(job_id) is holder:
                del self.starting[job_id]
                self.log.error(f"training job {job_id} could not start: {error}")
                self.send({"type": "train_error", "job_id": job_id, "error": error_text(error)})
            return
        if self.starting.get(job_id) is not holder:  # stopped, or started again, while it was set up
            session.stop()
            return
        del self.starting[job_id]
        self.sessions[job_id] = session
        session.finished.add_done_callback(lambda _: self.sessions.get(job_id) is session and self.sessions.pop(job_id))

    async def _open(self, frame: Frame, holder: Dict[str, Optional[Frame]]) -> TrainingSession:
        if frame["model"]["format"] != "torchscript":
            raise ValueError("this Python device trains TorchScript models only; ONNX training runs on Node devices")
        model = await self.models.file(frame["model"])
        data = frame["data"]
        dataset = None
        if data["type"] == "dataset":
            path = await self.models.file({"id": data["dataset_id"], "checksum": data["checksum"], "download_path": data["download_path"]})
            dataset = path.read_bytes()
        held = holder["weights"]
        if held is not None and held["round"] > frame["round"]:  # weights of a later round came meanwhile
            frame = {**frame, "round": held["round"], "weights": held["weights"]}
        device = "cuda" if self.cuda and _cuda_available() else "cpu"
        gpus = 1 if device == "cuda" else 0
        return await open_session(frame, model, dataset, self.send, lambda: readings(gpus, gpus > 0)["power_watts"], self.log, device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
