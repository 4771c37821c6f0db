"""Training a TorchScript model with torch's autograd, as the Node trainer trains an ONNX one: the job's
optimizer (sgd: w -= lr·g; adam: Kingma & Ba with bias correction, β 0.9/0.999, ε 1e-8), learning rate and
loss (`cross_entropy` on class indices, `mse` the mean over batch × outputs).

Weights are exchanged as named float32 arrays (§6.4): for a TorchScript model, every floating-point tensor of
its `state_dict()` (parameters and float buffers), named by its key (`fc1.weight`), flattened row-major."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


class TrainerError(Exception):
    pass


def create_optimizer(kind: str, learning_rate: float, parameters) -> torch.optim.Optimizer:
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise TrainerError(f"the learning rate must be a positive number, got {learning_rate}")
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate)
    if kind == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    raise TrainerError(f"unknown optimizer {kind}")


class TorchTrainable:
    """A TorchScript module being trained. `input_size`/`output_size`: floats per sample in and out (the
    synthetic task's sizes); `input_size` is given, or taken from the first weight matrix (`[out, in]`, as
    nn.Linear stores it)."""

    def __init__(self, path: Path, device: str = "cpu", input_size: Optional[int] = None) -> None:
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it is the format dcp serves
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device)
        self.module.train()
        self.tensors = {name: t for name, t in self.module.state_dict().items() if t.is_floating_point()}
        if not self.tensors:
            raise TrainerError("the model has no floating-point weights to train")
        self.input_size = input_size or self._first_matrix_columns()
        with torch.no_grad():
            out = self.module(torch.zeros(2, self.input_size, device=self.device))
        self.output_size = int(out.reshape(2, -1).shape[1])
        self.ends_in_softmax = _ends_in_softmax(self.module)

    def _first_matrix_columns(self) -> int:
        for tensor in self.tensors.values():
            if tensor.dim() == 2:
                return int(tensor.shape[1])
        raise TrainerError("cannot tell the model's input size (no weight matrix); the hub must send model.input_shape")

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {name: t.detach().to("cpu", torch.float32).reshape(-1).numpy().copy() for name, t in self.tensors.items()}

    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        """Replaces every weight; refused unless the names and sizes are exactly the model's."""
        if set(weights) != set(self.tensors):
            missing, extra = sorted(set(self.tensors) - set(weights)), sorted(set(weights) - set(self.tensors))
            raise TrainerError(f"the weights do not fit the model (missing {missing[:5]}, unknown {extra[:5]})")
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                values = weights[name]
                if values.size != tensor.numel():
                    raise TrainerError(f"weight {name}: {values.size} values for a tensor of {tensor.numel()}")
                tensor.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(tensor.shape))

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def loss(self, x: np.ndarray, labels: np.ndarray, kind: str) -> torch.Tensor:
        out = self.module(torch.from_numpy(x).to(self.device)).reshape(len(x), -1)
        target = torch.from_numpy(labels).to(self.device)
        if kind == "mse":
            return torch.nn.functional.mse_loss(out, target.reshape(out.shape).to(out.dtype))
        if kind == "cross_entropy":
            # a model ending in softmax gives probabilities: cross-entropy of their log (the Node trainer
            # takes the softmax's input as logits, which is the same loss)
            if self.ends_in_softmax:
                return torch.nn.functional.nll_loss(torch.log(out.clamp_min(1e-30)), target.long())
            return torch.nn.functional.cross_entropy(out, target.long())
        raise TrainerError(f"unknown loss {kind}")

    def train_step(self, optimizer: torch.optim.Optimizer, x: np.ndarray, labels: np.ndarray, kind: str) -> float:
        """One step on a batch; the batch's mean loss before the step."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, labels, kind)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainerError(f"the loss diverged ({value}); try a lower learning rate")
        loss.backward()
        optimizer.step()
        return value


def _ends_in_softmax(module: torch.jit.ScriptModule) -> bool:
    """Does the graph's output come straight from a softmax?"""
    try:
        graph = module.inlined_graph
        node = next(graph.outputs()).node()
        return node.kind() in ("aten::softmax", "aten::_softmax")
    except Exception:
        return False
