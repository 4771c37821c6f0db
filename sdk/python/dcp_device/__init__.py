"""dcp_device: a dcp device in Python (docs/device-protocol.md), for ONNX and TorchScript models."""

__version__ = "0.1.0"
