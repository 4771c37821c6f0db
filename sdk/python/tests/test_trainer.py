"""The trainer's steps against gradients and updates computed by hand (numpy, the Node trainer's formulas)
and against torch's own autograd and optimizers on an eager copy,
and a training session's frames."""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hub_accepts, mlp_torchscript
from dcp_device.log import DeviceLog
from dcp_device.protocol import dumps, weights_from_base64, weights_to_base64
from dcp_device.trainer import TorchTrainable, TrainerError, create_optimizer
from dcp_device.training import open_session

RNG = np.random.default_rng(3)


def linear_model(path: Path, inputs=3, outputs=2, softmax=False) -> TorchTrainable:
    torch.manual_seed(1)
    layers = [torch.nn.Linear(inputs, outputs)] + ([torch.nn.Softmax(dim=1)] if softmax else [])
    torch.jit.script(torch.nn.Sequential(*layers)).save(str(path))
    return TorchTrainable(path)


def grads(kind: str, W, b, x, labels):
    """dL/dW, dL/db of y = x W^T + b by hand."""
    y = x @ W.T + b
    n = len(x)
    if kind == "mse":
        dy = 2 * (y - labels) / y.size
    else:
        p = np.exp(y - y.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dy = (p - np.eye(y.shape[1])[labels]) / n
    return dy.T @ x, dy.sum(axis=0)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_an_sgd_step_moves_each_weight_by_lr_times_its_gradient(tmp_path: Path, loss):
    model = linear_model(tmp_path / "m.pt")
    assert (model.input_size, model.output_size) == (3, 2)
    before = model.get_weights()
    W, b = before["0.weight"].reshape(2, 3).astype(np.float64), before["0.bias"].astype(np.float64)
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    labels = RNG.normal(size=(5, 2)).astype(np.float32) if loss == "mse" else RNG.integers(0, 2, size=5)
    model.train_step(create_optimizer("sgd", 0.1, model.parameters()), x, labels, loss)
    dW, db = grads(loss, W, b, x.astype(np.float64), labels)
    after = model.get_weights()
    np.testing.assert_allclose(after["0.weight"].reshape(2, 3), W - 0.1 * dW, atol=1e-5)
    np.testing.assert_allclose(after["0.bias"], b - 0.1 * db, atol=1e-5)


def test_adam_steps_follow_the_node_trainers_formula(tmp_path: Path):
    model = linear_model(tmp_path / "m.pt")
    w = model.get_weights()
    W, b = w["0.weight"].reshape(2, 3).astype(np.float64), w["0.bias"].astype(np.float64)
    optimizer = create_optimizer("adam", 0.01, model.parameters())
    state = {"W": (np.zeros_like(W), np.zeros_like(W)), "b": (np.zeros_like(b), np.zeros_like(b))}
    for t in (1, 2, 3):
        x, labels = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
        model.train_step(optimizer, x, labels, "mse")
        dW, db = grads("mse", W, b, x.astype(np.float64), labels)
        c1, c2 = 1 - 0.9**t, math.sqrt(1 - 0.999**t)
        for key, g in (("W", dW), ("b", db)):
            m, v = state[key]
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            state[key] = (m, v)
            step = (0.01 * c2 / c1) * m / (np.sqrt(v) + 1e-8 * c2)
            if key == "W":
                W = W - step
            else:
                b = b - step
    after = model.get_weights()
    np.testing.assert_allclose(after["0.weight"].reshape(2, 3), W, atol=1e-5)
    np.testing.assert_allclose(after["0.bias"], b, atol=1e-5)


def test_a_model_ending_in_softmax_trains_on_the_cross_entropy_of_its_logits(tmp_path: Path):
    plain = linear_model(tmp_path / "a.pt")
    soft = linear_model(tmp_path / "b.pt", softmax=True)
    assert soft.ends_in_softmax and not plain.ends_in_softmax
    x, labels = RNG.normal(size=(6, 3)).astype(np.float32), RNG.integers(0, 2, size=6)
    for model in (plain, soft):
        model.train_step(create_optimizer("sgd", 0.5, model.parameters()), x, labels, "cross_entropy")
    for name, values in plain.get_weights().items():
        np.testing.assert_allclose(soft.get_weights()[name], values, atol=1e-5)


def test_weights_are_the_state_dicts_float_tensors_and_must_fit(tmp_path: Path):
    model = TorchTrainable(mlp_torchscript(tmp_path / "m.pt"))
    weights = model.get_weights()
    assert sorted(weights) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert weights["0.weight"].shape == (32,)
    changed = {name: values + 1 for name, values in weights.items()}
    model.set_weights(weights_from_base64(weights_to_base64(changed)))
    np.testing.assert_allclose(model.get_weights()["2.bias"], changed["2.bias"])
    with pytest.raises(TrainerError, match="do not fit"):
        model.set_weights({"0.weight": weights["0.weight"]})
    with pytest.raises(TrainerError, match="values for a tensor"):
        model.set_weights({**weights, "0.bias": np.zeros(3, dtype=np.float32)})
    with pytest.raises(TrainerError):
        create_optimizer("sgd", 0, model.parameters())


def train_start(path: Path, sync_mode: str, **config) -> dict:
    return {
        "type": "train_start", "job_id": "train_1", "round": 0,
        "model": {"id": "m", "format": "torchscript", "checksum": "sha256:" + "0" * 64, "download_path": "/x"},
        "config": {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 8, "local_steps": 5, "sync_mode": sync_mode, "sync_interval_ms": 60000, "loss": "cross_entropy", **config},
        "data": {"type": "stream", "task_seed": 1234, "stream_seed": 5, "clusters_per_class": 1},
    }


async def until(predicate, seconds: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_full_sync_session_sends_an_update_then_trains_on_from_the_rounds_weights(tmp_path: Path):
    path = mlp_torchscript(tmp_path / "m.pt")
    sent = []

    async def scenario():
        session = await open_session(train_start(path, "full_sync", optimizer="sgd", learning_rate=1e-9), path, None, lambda f: sent.append(f) or True, lambda: 42.0, DeviceLog())
        await until(lambda: len(sent) == 1)
        # full sync: nothing more until the round's weights come
        await asyncio.sleep(0.3)
        assert len(sent) == 1
        round_weights = {n: np.full_like(v, 0.25) for n, v in weights_from_base64(sent[0]["weights"]).items()}
        session.weights({"type": "train_weights", "job_id": "train_1", "round": 1, "weights": weights_to_base64(round_weights)})
        await until(lambda: len(sent) == 2)
        session.stop()
        await session.finished
        return round_weights

    round_weights = asyncio.run(scenario())
    first, second = sent
    assert first["type"] == "train_update" and first["base_round"] == 0 and second["base_round"] == 1
    assert (first["samples"], first["steps"]) == (40, 5) and math.isfinite(first["loss"]) and first["power_watts"] == 42.0
    for name, values in weights_from_base64(second["weights"]).items():
        np.testing.assert_allclose(values, round_weights[name], atol=1e-6)  # lr 1e-9: trained on from the round's weights
    assert hub_accepts([json.loads(dumps(f)) for f in sent]) == [{"ok": True}] * 2


def test_onnx_training_is_declined_and_a_bad_model_fails_cleanly(tmp_path: Path):
    path = mlp_torchscript(tmp_path / "m.pt")
    onnx_frame = train_start(path, "async")
    onnx_frame["model"]["format"] = "onnx"
    with pytest.raises(ValueError, match="TorchScript models only"):
        asyncio.run(open_session(onnx_frame, path, None, lambda f: True, lambda: 0.0, DeviceLog()))
    sent = []

    async def diverging():
        session = await open_session(train_start(path, "async", optimizer="sgd", learning_rate=1e30), path, None, lambda f: sent.append(f) or True, lambda: 0.0, DeviceLog())
        await session.finished

    asyncio.run(diverging())
    errors = [f for f in sent if f["type"] == "train_error"]
    assert errors and "diverged" in errors[0]["error"]
    assert hub_accepts(errors) == [{"ok": True}]


def test_an_async_dataset_session_trains_on_its_shard_and_pulls_the_jobs_weights(tmp_path: Path):
    # y = 2a - b, learnable by one linear layer; rows [0, 12) of the training part
    rows = [(a, b, 2 * a - b) for a in range(5) for b in range(4)]
    csv = "a,b,label\n" + "\n".join(f"{a},{b},{y}" for a, b, y in rows)
    torch.manual_seed(0)
    path = tmp_path / "lin.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 1))).save(str(path))
    frame = train_start(path, "async", optimizer="sgd", learning_rate=0.01, loss="mse", batch_size=4, local_steps=20, sync_interval_ms=100)
    frame["data"] = {"type": "dataset", "dataset_id": "ds_1", "download_path": "/x", "checksum": "sha256:" + "0" * 64, "format": "csv", "split_seed": 7, "validation_fraction": 0.2, "start": 0, "end": 12}
    sent = []

    async def scenario():
        session = await open_session(frame, path, csv.encode(), lambda f: sent.append(f) or True, lambda: 1.0, DeviceLog())
        await until(lambda: sum(f["type"] == "train_update" for f in sent) >= 2 and any(f["type"] == "weights_request" for f in sent))
        session.stop()
        await session.finished

    asyncio.run(scenario())
    updates = [f for f in sent if f["type"] == "train_update"]
    assert all(u["base_round"] == 0 and u["samples"] == 80 for u in updates), "async: trains on from its own weights while no round comes"
    assert updates[-1]["loss"] < updates[0]["loss"]
    assert {f["job_id"] for f in sent} == {"train_1"}
    assert hub_accepts([json.loads(dumps(f)) for f in sent]) == [{"ok": True}] * len(sent)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_deeper_models_gradients_and_steps_equal_torchs_own_on_an_eager_copy(tmp_path: Path, loss):
    """An MLP with a non-linearity (beyond the hand-derived linear case): the trainer's gradients and its
    Adam steps equal torch's autograd and torch.optim on an eager copy of the same weights."""
    torch.manual_seed(7)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    torch.jit.script(eager).save(str(tmp_path / "mlp.pt"))
    model = TorchTrainable(tmp_path / "mlp.pt")
    reference = torch.optim.Adam(eager.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    optimizer = create_optimizer("adam", 0.05, model.parameters())
    for _ in range(3):
        x = RNG.normal(size=(8, 4)).astype(np.float32)
        labels = RNG.normal(size=(8, 3)).astype(np.float32) if loss == "mse" else RNG.integers(0, 3, size=8)
        target = torch.from_numpy(labels)
        reference.zero_grad()
        out = eager(torch.from_numpy(x))
        expected = torch.nn.functional.mse_loss(out, target) if loss == "mse" else torch.nn.functional.cross_entropy(out, target.long())
        expected.backward()
        optimizer.zero_grad(set_to_none=True)
        got = model.loss(x, labels, loss)
        got.backward()
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        theirs = dict(eager.named_parameters())
        for name, parameter in model.module.named_parameters():
            np.testing.assert_allclose(parameter.grad.numpy(), theirs[name].grad.numpy(), atol=1e-6, err_msg=name)
        optimizer.step()
        reference.step()
    for name, values in model.get_weights().items():
        np.testing.assert_allclose(values, eager.state_dict()[name].detach().numpy().reshape(-1), atol=1e-6, err_msg=name)
