"""Against a real dcp server (`dcp start --workers 0`, its embedded Postgres in a temp DATA_DIR) and real
`python -m dcp_device` processes: registration, ONNX and TorchScript inference, an ONNX training job refused (Python devices train TorchScript only),
a batch, log pulls, a drain on SIGTERM and the identity kept across a restart."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import REPO, linear_onnx, mlp_torchscript

API_KEY = "test-api-key"  # the development customer `dcp start` creates
SDK = REPO / "sdk" / "python"


def wait_for(what: str, check: Callable[[], Any], seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Process:
    """A child process whose output is collected in the background."""

    def __init__(self, args: List[str], env: Dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: List[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout or []), daemon=True).start()

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Hub:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> Any:
        request = urllib.request.Request(f"{self.url}/api/v1{path}", data=body, method=method, headers={"X-API-Key": API_KEY, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None

    def post(self, path: str, payload: Dict[str, Any]) -> Any:
        return self.call("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def upload(self, path: Path, **fields: str) -> Dict[str, Any]:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
        parts += [path.read_bytes(), f"\r\n--{boundary}--\r\n".encode()]
        return self.call("POST", "/models", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def python_devices(self) -> List[Dict[str, Any]]:
        return [d for d in self.call("GET", "/devices")["devices"] if d["platform"] == "python"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    data_dir = Path(tempfile.mkdtemp(prefix="dcp-pytest-"))
    data_dir.chmod(0o755)  # embedded Postgres runs as the postgres user when we are root
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "EVENTSTORE_URL", "NODE_ENV")}
    port = free_port()
    server = Process(["node", "bin/dcp.js", "start", "--port", str(port), "--host", "127.0.0.1", "--workers", "0"], {**env, "DATA_DIR": str(data_dir)}, REPO)
    try:
        wait_for("the server to listen", lambda: "dcp listening" in server.text() or server.proc.poll() is not None, 120)
        assert server.proc.poll() is None, server.text()
        yield Hub(f"http://127.0.0.1:{port}")
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def start_device(hub: Hub, state_dir: Path) -> Process:
    env = {**os.environ, "PYTHONPATH": str(SDK)}
    return Process([sys.executable, "-m", "dcp_device", "--server", hub.url.replace("http", "ws"), "--state-dir", str(state_dir), "--max-tasks", "2", "--verbose"], env, SDK)


def test_a_python_device_serves_onnx_and_torchscript_inference(hub: Hub, tmp_path: Path):
    device = start_device(hub, tmp_path / "state")
    try:
        # given a Python device registered with the hub
        registered = wait_for("the device to register", lambda: [d for d in hub.python_devices() if d["status"] == "idle"], 60)
        assert len(registered) == 1
        info = registered[0]
        assert info["sdk_uuid"].startswith("sdk-python-") and info["capabilities"]["formats"] == ["onnx", "torchscript"]
        assert info["capabilities"]["train_formats"] == ["torchscript"], "it trains TorchScript, not ONNX"
        saved = json.loads((tmp_path / "state" / "device.json").read_text())
        assert saved["device_id"] == info["id"] and saved["sdk_token"].startswith("dcp_s_")

        # when a customer runs an ONNX model, then the device's answer is the model's
        rng = np.random.default_rng(11)
        W, b = rng.normal(size=(4, 3)), rng.normal(size=3)
        onnx_path = linear_onnx(tmp_path / "m.onnx", W, b)
        onnx_model = hub.upload(onnx_path, name="linear")
        x = rng.normal(size=(1, 4)).astype(np.float32)
        answer = hub.post("/inference", {"model_id": onnx_model["id"], "input": {"data": x.reshape(-1).tolist(), "shape": [1, 4]}})
        assert answer["status"] == "completed" and answer["device_id"] == info["id"]
        expected = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
        np.testing.assert_allclose(np.asarray(answer["result"]["data"]).reshape(1, 3), expected, atol=1e-5)

        # and a TorchScript model, run by torch.jit.load on the device
        ts_path = mlp_torchscript(tmp_path / "m.pt")
        ts_model = hub.upload(ts_path, name="mlp", format="torchscript")
        answer = hub.post("/inference", {"model_id": ts_model["id"], "input": {"data": x.reshape(-1).tolist(), "shape": [1, 4]}})
        expected = torch.jit.load(str(ts_path))(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(answer["result"]["data"]).reshape(1, 3), expected, atol=1e-5)

        # an ONNX training job for Python devices: none trains ONNX (train_formats), so the server refuses it
        # at once rather than queueing it for a device that would decline it
        try:
            hub.post("/training", {"model_id": onnx_model["id"], "data_config": {"total_samples": 1000}, "training_config": {"loss": "mse"}, "resource_config": {"sdk_types": ["python"]}})
            raise AssertionError("an ONNX training job for Python devices was accepted")
        except AssertionError as error:
            assert "HTTP 503" in str(error) and "NO_TRAINING_DEVICES" in str(error), str(error)

        # and a batch after that: every input answered once, in order
        xs = rng.normal(size=(6, 1, 4)).astype(np.float32)
        batch = hub.post("/inference/batch", {"model_id": onnx_model["id"], "inputs": [{"data": v.reshape(-1).tolist(), "shape": [1, 4]} for v in xs]})
        done = wait_for("the batch", lambda: (lambda j: j if j["status"] == "completed" else None)(hub.call("GET", f"/inference/{batch['job_id']}")), 60)
        assert [r["index"] for r in done["results"]] == list(range(6))
        for v, r in zip(xs, done["results"]):
            np.testing.assert_allclose(np.asarray(r["result"]["data"]).reshape(1, 3), v @ W + b, atol=1e-5)

        # the hub pulls the device's log lines about the customer's tasks
        lines = hub.call("GET", f"/devices/{info['id']}/logs?lines=100")["lines"]
        assert any(batch["job_id"] in line["message"] and "completed" in line["message"] for line in lines)

        # SIGTERM drains and stops with 0
        device.proc.send_signal(signal.SIGTERM)
        assert device.proc.wait(30) == 0
        assert "draining" in device.text()
        wait_for("the device offline", lambda: hub.python_devices()[0]["status"] == "offline", 30)

        # started again from its state dir, it comes back as the same device
        again = start_device(hub, tmp_path / "state")
        try:
            wait_for("the device back", lambda: [d for d in hub.python_devices() if d["status"] == "idle"], 60)
            assert [d["id"] for d in hub.python_devices()] == [info["id"]]
        finally:
            again.stop()
    finally:
        device.stop()
