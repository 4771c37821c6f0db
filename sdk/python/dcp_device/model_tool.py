"""The server's TorchScript tool: what the training coordinator needs of a TorchScript model, for a server
that has no torch of its own (src/commands/torch-tool.ts runs it from the project's Python environment).

A long-lived process speaking JSON lines: it prints {"ready": true, "torch": <version>} once torch is
imported, then answers each request line {"id", "op", ...} with one line {"id", "ok": true, "result"} or
{"id", "ok": false, "error"}. Models are sent once per process as {"key", "bytes" (base64)} and referred
to by key afterwards. Weights travel as the server's DCPW layout (src/domain/fedavg.ts encodeWeights),
base64: every floating-point tensor of the model's state_dict() by its key, flattened row-major, float32 —
what the Python device's trainer exchanges.

Operations:
  load      {model: {key, bytes}}                                   -> {}
  inspect   {model, input_size?}                                     -> {input_size, output_size, ends_in_softmax, parameters}
  weights   {model}                                                  -> {weights}
  evaluate  {model, weights, x, rows, labels, loss, input_size?}     -> {loss, accuracy}
  export    {model, weights}                                         -> {bytes}

Needs torch and numpy only (not the rest of dcp_device)."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import sys
import warnings

import numpy as np
import torch

MAGIC = b"DCPW"
FORMAT_VERSION = 1
MSE_TOLERANCE = 0.5
# Models kept loaded, least recently used dropped first (the server sends a dropped one again)
MAX_MODELS = int(os.environ.get("DCP_TOOL_MAX_MODELS", "16"))


class ToolError(Exception):
    pass


# ---- the DCPW weights layout ---------------------------------------------------------------------------


def decode_weights(data: bytes) -> dict:
    if len(data) < 8 or data[:4] != MAGIC:
        raise ToolError('not dcp weights (no "DCPW" at the start)')
    (header_length,) = struct.unpack_from("<I", data, 4)
    if 8 + header_length > len(data):
        raise ToolError("weights header runs past the end")
    header = json.loads(data[8 : 8 + header_length].decode("utf-8"))
    at = (8 + header_length + 3) // 4 * 4
    weights = {}
    for tensor in header["tensors"]:
        length = int(tensor["length"])
        if at + 4 * length > len(data):
            raise ToolError(f"tensor {tensor['name']} runs past the end of the weights")
        weights[tensor["name"]] = np.frombuffer(data, dtype="<f4", count=length, offset=at)
        at += 4 * length
    return weights


def encode_weights(weights: dict) -> bytes:
    names = sorted(weights)
    header = json.dumps({"version": FORMAT_VERSION, "tensors": [{"name": n, "length": int(weights[n].size)} for n in names]}, separators=(",", ":")).encode("utf-8")
    start = (8 + len(header) + 3) // 4 * 4
    out = bytearray(MAGIC + struct.pack("<I", len(header)) + header + b"\0" * (start - 8 - len(header)))
    for name in names:
        out += np.ascontiguousarray(weights[name], dtype="<f4").tobytes()
    return bytes(out)


# ---- a model ---------------------------------------------------------------------------------------------


class Model:
    def __init__(self, data: bytes) -> None:
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it is the format dcp serves
            warnings.simplefilter("ignore")
            try:
                self.module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            except Exception as error:  # a file torch cannot load is the customer's, not the tool's
                raise ToolError(f"torch.jit.load failed: {first_line(error)}") from None
        self.module.eval()
        self.state = self.module.state_dict()
        self.tensors = {name: t for name, t in self.state.items() if t.is_floating_point()}

    def input_size(self, given) -> int:
        if given:
            return int(given)
        for tensor in self.tensors.values():
            if tensor.dim() == 2:
                return int(tensor.shape[1])
        raise ToolError("cannot tell the model's input size (no 2-D weight): upload it with input_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            try:
                out = self.module(x)
            except Exception as error:
                raise ToolError(f"the model does not run on inputs of shape {list(x.shape)}: {first_line(error)}") from None
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise ToolError("the model's output is not one floating-point tensor")
        return out.reshape(x.shape[0], -1).float()

    def set_weights(self, weights: dict) -> None:
        if set(weights) != set(self.tensors):
            missing, extra = sorted(set(self.tensors) - set(weights)), sorted(set(weights) - set(self.tensors))
            raise ToolError(f"the weights do not fit the model (missing {missing[:5]}, unknown {extra[:5]})")
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                values = weights[name]
                if values.size != tensor.numel():
                    raise ToolError(f"weight {name}: {values.size} values for a tensor of {tensor.numel()}")
                tensor.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensor.shape))

    def weights(self) -> dict:
        return {name: t.detach().to(torch.float32).reshape(-1).numpy().copy() for name, t in self.tensors.items()}

    def ends_in_softmax(self) -> bool:
        try:
            graph = self.module.inlined_graph  # held: its nodes are invalid once the graph is freed
            return next(graph.outputs()).node().kind() in ("aten::softmax", "aten::_softmax")
        except Exception:
            return False


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:500] if text else type(error).__name__


# ---- the operations ------------------------------------------------------------------------------------


class Tool:
    def __init__(self) -> None:
        self.models: dict = {}  # insertion order is recency

    def model(self, request: dict) -> Model:
        ref = request.get("model") or {}
        key = ref.get("key")
        if not isinstance(key, str):
            raise ToolError("model.key: required")
        if "bytes" in ref:
            self.models.pop(key, None)
            self.models[key] = Model(base64.b64decode(ref["bytes"]))
            while len(self.models) > MAX_MODELS:
                self.models.pop(next(iter(self.models)))
        if key not in self.models:
            raise ToolError(f"model {key} is not loaded")
        self.models[key] = self.models.pop(key)
        return self.models[key]

    def handle(self, request: dict):
        op = request.get("op")
        model = self.model(request)
        if op == "load":
            return {}
        if op == "inspect":
            return self.inspect(model, request.get("input_size"))
        if op == "weights":
            return {"weights": base64.b64encode(encode_weights(model.weights())).decode("ascii")}
        if op == "evaluate":
            return self.evaluate(model, request)
        if op == "export":
            model.set_weights(decode_weights(base64.b64decode(request["weights"])))
            out = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(model.module, out)
            return {"bytes": base64.b64encode(out.getvalue()).decode("ascii")}
        raise ToolError(f"unknown op {op}")

    def inspect(self, model: Model, given) -> dict:
        if not model.tensors:
            raise ToolError("the model has no floating-point weights to train")
        size = model.input_size(given)
        out = model.forward(torch.zeros(2, size))
        parameters = [{"name": n, "shape": list(t.shape), "trainable": t.requires_grad} for n, t in model.module.named_parameters()]
        return {"input_size": size, "output_size": int(out.shape[1]), "ends_in_softmax": model.ends_in_softmax(), "parameters": parameters}

    def evaluate(self, model: Model, request: dict) -> dict:
        rows = int(request["rows"])
        x = np.frombuffer(base64.b64decode(request["x"]), dtype="<f4")
        labels = np.frombuffer(base64.b64decode(request["labels"]), dtype="<f4")
        if rows < 1 or x.size % rows != 0:
            raise ToolError(f"x: {x.size} floats are not {rows} rows")
        model.set_weights(decode_weights(base64.b64decode(request["weights"])))
        out = model.forward(torch.from_numpy(x.reshape(rows, -1).copy()))
        target = torch.from_numpy(labels.copy())
        loss = request.get("loss")
        if loss == "cross_entropy":
            if target.numel() != rows:
                raise ToolError(f"{target.numel()} labels for {rows} rows")
            classes = target.long()
            # a model ending in softmax gives probabilities: the cross-entropy of their log
            value = torch.nn.functional.nll_loss(torch.log(out.clamp_min(1e-30)), classes) if model.ends_in_softmax() else torch.nn.functional.cross_entropy(out, classes)
            accuracy = (out.argmax(dim=1) == classes).float().mean()
        elif loss == "mse":
            if target.numel() != out.numel():
                raise ToolError(f"{target.numel()} targets for {out.numel()} outputs")
            target = target.reshape(out.shape)
            value = torch.nn.functional.mse_loss(out, target)
            accuracy = ((out - target).abs() < MSE_TOLERANCE).all(dim=1).float().mean()
        else:
            raise ToolError(f"unknown loss {loss}")
        return {"loss": float(value), "accuracy": float(accuracy)}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("DCP_TOOL_THREADS", "1")))
    tool = Tool()
    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            answer = {"id": request_id, "ok": True, "result": tool.handle(request)}
        except ToolError as error:
            answer = {"id": request_id, "ok": False, "error": str(error)}
        except Exception as error:  # answered, so the server's call fails with it instead of waiting
            answer = {"id": request_id, "ok": False, "error": f"{type(error).__name__}: {first_line(error)}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
