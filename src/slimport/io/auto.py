"""Open any checkpoint: find the weights file, detect its format, read it lazily, attach the
config and tokenizer files beside it; a compressed-tensors model reads as its float weights."""

from __future__ import annotations

import importlib
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io import formats
from slimport.io.base import Checkpoint, parse_json, regular_file
from slimport.io.compressed import dequantized_view, is_compressed
from slimport.io.gguf_sidecar import SIDECAR


def open_checkpoint(
    path: str | Path, fmt: str | None = None, config: str | Path | None = None
) -> Checkpoint:
    """Open any supported checkpoint lazily. `config` overrides the config.json beside it."""
    p = formats.resolve_path(path)
    reader = formats.get(fmt or formats.detect_format(p)).reader
    ckpt = importlib.import_module(reader).read(p)
    if config is not None:
        ckpt.config = read_json(Path(config))
    elif ckpt.config is None and (p.parent / "config.json").exists():
        ckpt.config = read_json(p.parent / "config.json")
    if not ckpt.tokenizer_files:
        ckpt.tokenizer_files = tokenizer_files(p.parent)
    if is_compressed(ckpt.config):
        # a model slimport (or llm-compressor) quantized: read as the float model it computes
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
    SIDECAR,  # gguf_metadata.json: a GGUF source's general.*/tokenizer.* keys
)


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def read_json(path: Path) -> dict:
    try:
        data = regular_file(Path(path)).read_bytes()
    except OSError as e:
        raise SlimportError(f"{path}: cannot read JSON ({e})") from None
    return parse_json(data, path)
