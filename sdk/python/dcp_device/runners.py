"""Running a model: ONNX with onnxruntime, TorchScript with torch.jit.load. Tensors come and go as the
frames carry them (flat float lists and a shape, float32 on the device)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

Tensor = Dict[str, Any]


def to_array(tensor: Tensor) -> np.ndarray:
    shape = tensor["shape"]
    expected = int(np.prod(shape)) if shape else 1
    if expected != len(tensor["data"]):
        raise ValueError(f"bad input: shape [{', '.join(map(str, shape))}] needs {expected} values, got {len(tensor['data'])}")
    return np.asarray(tensor["data"], dtype=np.float32).reshape(shape)


def from_array(array: np.ndarray) -> Tensor:
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"the model output is of type {array.dtype}; only numeric outputs can be returned")
    return {"data": array.astype(np.float64).reshape(-1).tolist(), "shape": [int(d) for d in array.shape]}


class Runner:
    """A loaded model. `gpu`: it runs on CUDA. `dynamic_batch`: its first input dimension may vary (None: unknown, try)."""

    gpu = False

    def run(self, array: np.ndarray, input_name: Optional[str]) -> np.ndarray:
        raise NotImplementedError

    def dynamic_batch(self, input_name: Optional[str]) -> Optional[bool]:
        return None

    def run_all(self, inputs: Sequence[Tensor], input_name: Optional[str]) -> List[Tensor]:
        """Inputs whose shapes differ only in the first dimension run as one call, stacked along it, when the
        model allows (as the Node SDK does); otherwise, or when the stacked output does not split by rows,
        one call each."""
        arrays = [to_array(t) for t in inputs]
        if len(arrays) > 1 and self.dynamic_batch(input_name) is not False and len({a.shape[1:] for a in arrays}) == 1 and arrays[0].ndim > 0:
            stacked = self._run_stacked(arrays, input_name)
            if stacked is not None:
                return stacked
        return [from_array(self.run(a, input_name)) for a in arrays]

    def _run_stacked(self, arrays: List[np.ndarray], input_name: Optional[str]) -> Optional[List[Tensor]]:
        rows = [a.shape[0] for a in arrays]
        try:
            out = self.run(np.concatenate(arrays), input_name)
        except Exception:
            if self.dynamic_batch(input_name):
                raise
            return None  # TorchScript declares no shapes: a model that takes no stack runs input by input
        if out.ndim == 0 or out.shape[0] != sum(rows):
            return None
        bounds = np.cumsum(rows)[:-1]
        return [from_array(part) for part in np.split(out, bounds)]


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int, cuda: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = self.session.get_outputs()
        if not self.inputs or not outputs:
            raise ValueError("the model has no inputs" if not self.inputs else "the model has no outputs")
        self.output = outputs[0].name

    def _input(self, name: Optional[str]) -> str:
        if name is None:
            return next(iter(self.inputs))
        if name not in self.inputs:
            raise ValueError(f"the model has no input {name!r} (inputs: {', '.join(self.inputs)})")
        return name

    def dynamic_batch(self, input_name: Optional[str]) -> Optional[bool]:
        shape = self.inputs[self._input(input_name)].shape
        return bool(shape) and not (isinstance(shape[0], int) and shape[0] >= 1)

    def run(self, array: np.ndarray, input_name: Optional[str]) -> np.ndarray:
        return self.session.run([self.output], {self._input(input_name): array})[0]


class TorchScriptRunner(Runner):
    def __init__(self, path: Path, threads: int, cuda: bool) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
        self.gpu = self.device.type == "cuda"
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it is the format dcp serves
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device)
        self.module.eval()
        arguments = self.module.forward.schema.arguments[1:]  # the first is self
        self.argument_names = [a.name for a in arguments]

    def run(self, array: np.ndarray, input_name: Optional[str]) -> np.ndarray:
        torch = self.torch
        if input_name is not None and input_name not in self.argument_names:
            raise ValueError(f"the model has no input {input_name!r} (inputs: {', '.join(self.argument_names)})")
        x = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        with torch.inference_mode():
            out = self.module(**{input_name: x}) if input_name else self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model returned {type(out).__name__}, not a tensor")
        return out.detach().to("cpu").numpy()


def load_runner(path: Path, format: str, threads: int, cuda: bool) -> Runner:
    if format == "onnx":
        return OnnxRunner(path, threads, cuda)
    if format == "torchscript":
        return TorchScriptRunner(path, threads, cuda)
    raise ValueError(f"model format {format} is not supported by this device")


def torch_available() -> bool:
    """Is torch installed (the `torch` extra)? Found without importing it, which takes seconds."""
    return importlib.util.find_spec("torch") is not None
