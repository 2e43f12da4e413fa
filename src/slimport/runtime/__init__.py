"""Runtimes that execute converted models (MindSpore Cells; ONNX Runtime later)."""
