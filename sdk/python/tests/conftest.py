"""Shared helpers: small ONNX and TorchScript models made here, the Node fixtures, and the hub's own schema
check for device frames (tests/fixtures/check-device-frames.ts, run with the repository's tsx)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).parent / "fixtures"
TSX = REPO / "node_modules" / ".bin" / "tsx"


@pytest.fixture(scope="session")
def node_fixtures() -> Dict[str, Any]:
    return json.loads((FIXTURES / "node-fixtures.json").read_text())


def hub_accepts(frames: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The hub's zod DeviceFrame verdict on each frame."""
    if not TSX.exists() or shutil.which("node") is None:
        pytest.fail(f"the schema check needs node and {TSX} (npm ci in the repository)")
    done = subprocess.run([str(TSX), str(FIXTURES / "check-device-frames.ts")], input=json.dumps(frames), capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    return json.loads(done.stdout)


def linear_onnx(path: Path, weights: np.ndarray, bias: np.ndarray, batch: Any = "N") -> Path:
    """y = x @ W + b as an ONNX file; `batch` is the first input dimension ("N": dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs, outputs = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
        [numpy_helper.from_array(weights.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def mlp_torchscript(path: Path, inputs: int = 4, hidden: int = 8, outputs: int = 3, softmax: bool = False, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    layers = [torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)]
    if softmax:
        layers.append(torch.nn.Softmax(dim=1))
    torch.jit.script(torch.nn.Sequential(*layers)).save(str(path))
    return path
