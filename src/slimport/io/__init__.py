"""Checkpoint formats: detection, lazy readers and atomic writers, one module per format.

The names below load on first use (PEP 562): the CLI imports `slimport.io.formats` to build
its choices, and `slimport --help` should not wait seconds for torch, which io.base needs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Checkpoint": "slimport.io.base",
    "TensorInfo": "slimport.io.base",
    "atomic_dir": "slimport.io.base",
    "atomic_path": "slimport.io.base",
    "detect_format": "slimport.io.formats",
    "resolve_path": "slimport.io.formats",
    "open_checkpoint": "slimport.io.auto",
    "read_json": "slimport.io.auto",
    "tokenizer_files": "slimport.io.auto",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
