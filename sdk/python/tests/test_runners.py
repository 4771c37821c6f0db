"""Tasks run through the device's path (frame tensors in, result frame out) equal the model run directly."""
from __future__ import annotations

import asyncio
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import linear_onnx, mlp_torchscript
from dcp_device.log import DeviceLog
from dcp_device.models import ModelStore
from dcp_device.runners import load_runner
from dcp_device.tasks import Meters, run_task

RNG = np.random.default_rng(7)


def tensor(array: np.ndarray) -> dict:
    return {"data": array.reshape(-1).tolist(), "shape": list(array.shape)}


def run(task_inputs: dict, runner, input_name=None) -> dict:
    async def load(_model, _on_bytes):
        return runner

    task = {"type": "task", "task_id": "t", "lease_id": "l", "lease_deadline": "x", "model": {}, **task_inputs}
    if input_name:
        task["input_name"] = input_name
    return asyncio.run(run_task(task, load, Meters()))


def test_an_onnx_task_equals_onnxruntime_and_the_math(tmp_path: Path):
    W, b = RNG.normal(size=(4, 3)), RNG.normal(size=3)
    path = linear_onnx(tmp_path / "m.onnx", W, b)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    result = run({"input": tensor(x)}, load_runner(path, "onnx", 1, False))
    assert result["status"] == "completed"
    assert result["output"]["shape"] == [2, 3]
    direct = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(result["output"]["data"]).reshape(2, 3), direct, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result["output"]["data"]).reshape(2, 3), x @ W + b, atol=1e-5)
    assert result["metrics"]["bytes_in"] == 4 * 8 and result["metrics"]["bytes_out"] == 4 * 6
    assert result["metrics"]["cpu_ms"] >= 0 and result["metrics"]["gpu_ms"] == 0


@pytest.mark.parametrize("batch", ["N", 1])
def test_a_batch_task_gives_one_output_per_input_stacked_or_not(tmp_path: Path, batch):
    W, b = RNG.normal(size=(4, 3)), RNG.normal(size=3)
    runner = load_runner(linear_onnx(tmp_path / "m.onnx", W, b, batch=batch), "onnx", 1, False)
    xs = [RNG.normal(size=(1, 4)).astype(np.float32) for _ in range(3)] + ([RNG.normal(size=(2, 4)).astype(np.float32)] if batch == "N" else [])
    result = run({"inputs": [tensor(x) for x in xs]}, runner)
    assert result["status"] == "completed", result.get("error")
    assert [o["shape"] for o in result["outputs"]] == [[len(x), 3] for x in xs]
    for x, out in zip(xs, result["outputs"]):
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(len(x), 3), x @ W + b, atol=1e-5)


def test_a_torchscript_task_equals_torch_jit_load(tmp_path: Path):
    path = mlp_torchscript(tmp_path / "m.pt")
    xs = [RNG.normal(size=(1, 4)).astype(np.float32) for _ in range(3)]
    runner = load_runner(path, "torchscript", 1, False)
    single = run({"input": tensor(xs[0])}, runner)
    batch = run({"inputs": [tensor(x) for x in xs]}, runner, input_name="input")
    module = torch.jit.load(str(path))
    for x, out in zip(xs, [single["output"]] + batch["outputs"][1:]):
        expected = module(torch.from_numpy(x)).detach().numpy()
        assert out["shape"] == list(expected.shape)
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(expected.shape), expected, atol=1e-5)
    np.testing.assert_allclose(batch["outputs"][0]["data"], single["output"]["data"], atol=1e-5)


def test_bad_inputs_fail_the_task_with_the_reason(tmp_path: Path):
    onnx_runner = load_runner(linear_onnx(tmp_path / "m.onnx", np.eye(4, 3), np.zeros(3)), "onnx", 1, False)
    short = run({"input": {"data": [1, 2, 3], "shape": [1, 4]}}, onnx_runner)
    assert short["status"] == "failed" and "needs 4 values, got 3" in short["error"]
    unknown = run({"input": tensor(np.ones((1, 4)))}, onnx_runner, input_name="nope")
    assert unknown["status"] == "failed" and "no input 'nope'" in unknown["error"]
    ts_runner = load_runner(mlp_torchscript(tmp_path / "m.pt"), "torchscript", 1, False)
    wrong = run({"input": tensor(np.ones((1, 5)))}, ts_runner)
    assert wrong["status"] == "failed" and wrong["error"]


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    tokens: list = []

    def do_GET(self):  # noqa: N802
        self.tokens.append(self.headers.get("X-SDK-Token"))
        if len(self.tokens) == 1:  # the hub's read model does not know the new token yet
            self.send_response(401)
            self.end_headers()
            return
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def test_models_download_with_the_token_are_verified_and_cached(tmp_path: Path):
    model = linear_onnx(tmp_path / "m.onnx", np.eye(2), np.zeros(2)).read_bytes()
    _Files.files = {"/api/v1/sdk/models/m1": model, "/api/v1/sdk/models/bad": b"not the model"}
    _Files.tokens = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = ModelStore(f"http://127.0.0.1:{server.server_port}", tmp_path / "cache", lambda: "dcp_s_tok", DeviceLog(), 1, False)
        checksum = "sha256:" + hashlib.sha256(model).hexdigest()
        counted = []

        async def both():
            ref = {"id": "m1", "format": "onnx", "checksum": checksum, "download_path": "/api/v1/sdk/models/m1"}
            return await asyncio.gather(store.runner(ref, counted.append), store.runner(ref, counted.append))

        first, second = asyncio.run(both())
        assert first is second, "two tasks of one model share one download and one session"
        assert sum(counted) == len(model) and _Files.tokens == ["dcp_s_tok", "dcp_s_tok"], "a first 401 is tried again"
        assert (tmp_path / "cache" / checksum[7:]).read_bytes() == model
        bad = {"id": "bad", "format": "onnx", "checksum": checksum, "download_path": "/api/v1/sdk/models/bad"}
        with pytest.raises(ValueError, match="checksum mismatch"):
            asyncio.run(ModelStore(store.server, tmp_path / "cache2", lambda: None, DeviceLog(), 1, False).runner(bad, lambda n: None))
        assert not any((tmp_path / "cache2").iterdir()), "nothing is cached from a bad download"
    finally:
        server.shutdown()


def test_an_output_json_cannot_carry_fails_the_task_saying_where(tmp_path: Path):
    # log(x) of a negative input is NaN: the hub would refuse the frame, so the task fails with the reason
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "log.onnx"))
    result = run({"input": {"data": [1.0, -1.0], "shape": [1, 2]}}, load_runner(tmp_path / "log.onnx", "onnx", 1, False))
    assert result["status"] == "failed" and "output 0: value 1 is nan" in result["error"]
    assert "output" not in result
