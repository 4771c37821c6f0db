"""Frames and weights against what the Node side makes and accepts (tests/fixtures/node-fixtures.json from
make-node-fixtures.ts; device frames checked by the hub's own zod schema)."""
from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import hub_accepts, linear_onnx
from dcp_device.datasets import parse_dataset, training_rows
from dcp_device.device import Device, DeviceOptions, endpoints
from dcp_device.log import DeviceLog
from dcp_device.protocol import FrameError, decode_weights, dumps, encode_weights, parse_hub_frame, weights_from_base64
from dcp_device.synthetic import SyntheticTask, mix_seeds
from dcp_device.tasks import Meters, run_task
from dcp_device.runners import load_runner


def test_every_hub_frame_the_hub_sends_parses(node_fixtures):
    for frame in node_fixtures["hub_frames"]:
        parsed = parse_hub_frame(json.dumps(frame))
        assert parsed["type"] == frame["type"]
    task = parse_hub_frame(json.dumps(node_fixtures["hub_frames"][3]))
    assert [t["shape"] for t in task["inputs"]] == [[1, 2], [2, 2]] and task["input_name"] == "x"


def test_frames_the_hub_schema_refuses_are_refused(node_fixtures):
    for frame in node_fixtures["invalid_hub_frames"]:
        with pytest.raises(FrameError):
            parse_hub_frame(json.dumps(frame))
    for text in ("not json", "[1,2]", b'{"type":"registered"}'):
        with pytest.raises(FrameError):
            parse_hub_frame(text)


def test_weights_decode_what_node_encodes_and_encode_the_same_bytes(node_fixtures):
    fixture = node_fixtures["weights"]
    decoded = weights_from_base64(fixture["base64"])
    assert list(decoded) == sorted(fixture["values"])
    for name, values in fixture["values"].items():
        np.testing.assert_array_equal(decoded[name], np.asarray(values, dtype=np.float32))
    mine = encode_weights({name: np.asarray(v, dtype=np.float32) for name, v in fixture["values"].items()})
    assert base64.b64encode(mine).decode() == fixture["base64"]
    with pytest.raises(ValueError):
        decode_weights(mine[:-4])
    with pytest.raises(ValueError):
        decode_weights(b"XXXX" + mine[4:])


def test_seeds_synthetic_samples_and_dataset_split_equal_node(node_fixtures):
    for case in node_fixtures["mix_seeds"]:
        assert mix_seeds(*case["seeds"]) == case["value"], case["seeds"]
    c = node_fixtures["synthetic"]["classification"]
    x, labels = SyntheticTask(c["inputs"], c["outputs"], c["seed"], "classification", c["clusters_per_class"]).sample(c["count"], c["stream_seed"])
    np.testing.assert_allclose(x.reshape(-1), c["x"], rtol=1e-6)
    assert labels.tolist() == c["labels"]
    r = node_fixtures["synthetic"]["regression"]
    x, targets = SyntheticTask(r["inputs"], r["outputs"], r["seed"], "regression").sample(r["count"], r["stream_seed"])
    np.testing.assert_allclose(x.reshape(-1), r["x"], rtol=1e-6)
    np.testing.assert_allclose(targets.reshape(-1), r["labels"], rtol=1e-5)
    d = node_fixtures["dataset"]
    features, labels = parse_dataset(d["csv"].encode(), "csv")
    rows = training_rows(len(labels), d["validation_fraction"], d["split_seed"])
    np.testing.assert_allclose(features[rows].reshape(-1), d["train_features"])
    np.testing.assert_allclose(labels[rows], d["train_labels"])


def test_the_urls_a_device_derives_from_its_server_flag():
    assert endpoints("ws://h:3000") == ("http://h:3000", "ws://h:3000/api/v1/devices/connect")
    assert endpoints("https://h/dcp/") == ("https://h/dcp", "wss://h/dcp/api/v1/devices/connect")
    assert endpoints("ws://h:3000/api/v1/devices/connect")[1] == "ws://h:3000/api/v1/devices/connect"
    with pytest.raises(ValueError):
        endpoints("ftp://h")


def test_the_frames_a_python_device_sends_pass_the_hubs_schema(tmp_path: Path):
    device = Device(DeviceOptions(server="ws://127.0.0.1:1", state_dir=tmp_path, enrollment_token="dcp_e_x", max_tasks=2))
    from dcp_device.machine import describe_hardware
    from dcp_device.state import load_state

    device.state = load_state(tmp_path)
    device.hardware = describe_hardware(False)
    register = device._register_frame()
    assert register["platform"] == "python" and register["sdk_uuid"].startswith("sdk-python-")
    assert register["capabilities"]["formats"] == ["onnx", "torchscript"]
    heartbeat = device._heartbeat_frame()

    model = linear_onnx(tmp_path / "m.onnx", np.eye(2, 3), np.zeros(3))
    runner = load_runner(model, "onnx", 1, False)

    async def load(_model, _on_bytes):
        return runner

    base = {"type": "task", "task_id": "t1", "lease_id": "l1", "lease_deadline": "x", "model": {}}
    completed = asyncio.run(run_task({**base, "inputs": [{"data": [1, 2], "shape": [1, 2]}]}, load, Meters()))
    failed = asyncio.run(run_task({**base, "input": {"data": [1, 2, 3], "shape": [1, 2]}}, load, Meters()))
    assert completed["status"] == "completed" and failed["status"] == "failed"
    log = DeviceLog()
    log.info("task t1 completed")
    logs = {"type": "logs", "request_id": "r1", "lines": log.tail(10, "all")}
    frames = [register, heartbeat, completed, failed, logs, {"type": "draining"}]
    verdicts = hub_accepts([json.loads(dumps(f)) for f in frames])
    assert verdicts == [{"ok": True}] * len(frames)
    # the check can fail: a frame the hub would refuse is refused
    broken = copy.deepcopy(register)
    broken["capabilities"]["formats"] = ["tflite"]
    assert hub_accepts([broken])[0]["ok"] is False
