"""ONNX export (graphs built with the `onnx` library, hub tensor names) and ONNX Runtime sessions."""

from slimport.runtime.onnx.export import export_onnx
from slimport.runtime.onnx.session import OnnxModel

__all__ = ["OnnxModel", "export_onnx"]
