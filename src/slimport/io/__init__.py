"""Checkpoint formats: detection, lazy readers and atomic writers, one module per format."""

from __future__ import annotations

import json
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, atomic_dir, atomic_path

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "atomic_dir",
    "atomic_path",
    "detect_format",
    "open_checkpoint",
]

# format name -> module with `read(path) -> Checkpoint`
READERS = {
    "safetensors": "slimport.io.safetensors",
    "pytorch": "slimport.io.torch_pickle",
    "keras": "slimport.io.keras_h5",
    "gguf": "slimport.io.gguf",
    "mindspore": "slimport.io.mindspore_ckpt",
    "llama2c": "slimport.io.llama2c",
    "onnx": "slimport.io.onnx",
}

_SUFFIX = {
    ".safetensors": "safetensors",
    ".bin": "pytorch",  # llama2.c .bin files are told apart by their content below
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".h5": "keras",
    ".keras": "keras",
    ".gguf": "gguf",
    ".ckpt": "mindspore",
    ".onnx": "onnx",
}

# Files to look for when SRC is a folder, most preferred first.
_FOLDER_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "tf_model.h5",
    "model.ckpt",
    "model.gguf",
    "model.onnx",
)


def resolve_path(path: str | Path) -> Path:
    """The weights file for a file or an HF-style folder."""
    p = Path(path)
    if not p.exists():
        raise SlimportError(f"{p}: no such file or folder")
    if p.is_file():
        return p
    for name in _FOLDER_FILES:
        if (p / name).exists():
            return p / name
    for pattern in ("*.safetensors", "*.gguf", "*.ckpt", "*.h5", "*.bin", "*.onnx"):
        found = sorted(p.glob(pattern))
        if len(found) == 1:
            return found[0]
    raise SlimportError(f"{p}: folder holds no checkpoint file slimport recognises")


def detect_format(path: Path) -> str:
    if path.name.endswith(".index.json"):
        return "safetensors" if "safetensors" in path.name else "pytorch"
    fmt = _SUFFIX.get(path.suffix.lower())
    if fmt == "pytorch" and path.suffix == ".bin":
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither zip nor pickle: llama2.c
            fmt = "llama2c"
    if fmt is None:
        raise SlimportError(
            f"{path}: unknown checkpoint format (suffix {path.suffix!r})",
            hint="pass --from FORMAT, one of: " + ", ".join(READERS),
        )
    return fmt


def open_checkpoint(
    path: str | Path, fmt: str | None = None, config: str | Path | None = None
) -> Checkpoint:
    """Open any supported checkpoint lazily. `config` overrides the config.json beside it."""
    import importlib

    p = resolve_path(path)
    fmt = fmt or detect_format(p)
    if fmt not in READERS:
        raise SlimportError(f"unknown --from format {fmt!r}", hint="one of: " + ", ".join(READERS))
    ckpt = importlib.import_module(READERS[fmt]).read(p)
    if config is not None:
        ckpt.config = read_json(Path(config))
    elif ckpt.config is None and (p.parent / "config.json").exists():
        ckpt.config = read_json(p.parent / "config.json")
    if not ckpt.tokenizer_files:
        ckpt.tokenizer_files = tokenizer_files(p.parent)
    qc = (ckpt.config or {}).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        # a model slimport (or llm-compressor) quantized: read as the float model it computes
        from slimport.compress.quant.compressed import dequantized_view

        try:
            ckpt = dequantized_view(ckpt)
        except BaseException:
            ckpt.close()
            raise
    return ckpt


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers >= 4.50 saves the chat template beside the tokenizer
)


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SlimportError(f"{path}: cannot read JSON ({e})") from None
