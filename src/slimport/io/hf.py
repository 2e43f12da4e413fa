"""Hugging Face model folder: config.json + safetensors (sharded when large) + tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slimport.io import safetensors
from slimport.io.base import Checkpoint


def write_model(folder: Path, tensors: list, job, progress=None) -> list[str]:
    """Write into `folder` (a temp folder the caller renames); return the file names written."""
    written = safetensors.write_sharded(folder, tensors, progress=progress)
    write_config(folder, job)
    return [*written, "config.json", *copy_tokenizer(folder, job.source)]


def write_config(folder: Path, job) -> None:
    """config.json of the converted model; a --dtype cast is recorded as its torch_dtype."""
    config = dict(job.config)
    if job.dtype is not None:
        config["torch_dtype"] = str(job.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(folder: Path, source: Checkpoint) -> list[str]:
    """Tokenizer files beside the source, or the one the format embeds (GGUF)."""
    if source.tokenizer_files:
        for f in source.tokenizer_files:
            shutil.copyfile(f, folder / f.name)
        return [f.name for f in source.tokenizer_files]
    if source.tokenizer_writer is not None:
        return source.tokenizer_writer(folder)
    return []
