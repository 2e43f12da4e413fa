"""gguf_metadata.json: a GGUF file's `general.*` and `tokenizer.*` metadata, kept beside a
Hugging Face folder made from it, so converting that folder back to GGUF reproduces them.

An HF folder has no place for `general.license`, `general.organization`, `tokenizer.ggml.pre`
and the like, and llama.cpp's tools show or rely on them. The large tokenizer arrays are not
stored: tokenizer.json holds them, and the GGUF writer rebuilds them from it. The file travels
with the tokenizer files (convert, quantize), like generation_config.json does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io.base import parse_json, regular_file

SIDECAR = "gguf_metadata.json"
_PREFIXES = ("general.", "tokenizer.")
_REBUILT = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.scores")  # fmt: skip


def write_sidecar(meta: dict, folder: Path) -> list[str]:
    """Write folder/gguf_metadata.json from a GGUF file's parsed metadata; return [its name]."""
    vtypes = meta.get("gguf_value_types", {})
    keys = [k for k in meta if k.startswith(_PREFIXES) and k not in _REBUILT]
    doc = {
        "about": "metadata of the GGUF file this folder was converted from; "
        "slimport writes it back when converting to GGUF",
        "metadata": {k: _plain(meta[k]) for k in keys},
        "types": {k: vtypes[k] for k in keys if k in vtypes},
    }
    (folder / SIDECAR).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return [SIDECAR]


def read_sidecar(folder: Path) -> tuple[dict, dict]:
    """(metadata, GGUF value types) from folder/gguf_metadata.json; ({}, {}) when absent."""
    path = folder / SIDECAR
    if not path.is_file():
        return {}, {}
    doc = parse_json(regular_file(path).read_bytes(), path)
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        raise SlimportError(
            f"{path}: not a slimport GGUF metadata file (no 'metadata' object)",
            hint="delete it to convert without the original GGUF metadata",
        )
    return doc["metadata"], dict(doc.get("types") or {})


def _plain(value):
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
