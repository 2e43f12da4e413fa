"""Hugging Face model folder: config.json + safetensors (sharded when large) + tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io import safetensors
from slimport.io.base import Checkpoint


def write_model(folder: Path, tensors: list, job, progress=None) -> list[str]:
    """Write into `folder` (a temp folder the caller renames); return the file names written."""
    size = job.options.get("max_shard_size", safetensors.MAX_SHARD_SIZE)
    written = safetensors.write_sharded(folder, tensors, size, progress=progress)
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


def load_tokenizer(path: str | Path):
    """The tokenizer that belongs to a checkpoint: files beside it, or a GGUF's embedded one."""
    from transformers import AutoTokenizer  # here: io's readers and writers never need transformers

    p = Path(path)
    try:
        if p.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        else:
            tok = AutoTokenizer.from_pretrained(p if p.is_dir() else p.parent)
    except (OSError, ValueError) as e:
        raise SlimportError(
            f"{path}: no tokenizer found beside the model ({str(e).splitlines()[0]})",
            hint="convert with `slimport convert ... --to hf`, which writes the tokenizer files",
        ) from None
    tok.padding_side = "left"  # decoder-only batches pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_class(name: object) -> type:
    """The transformers class a config's `architectures` names, only if transformers' auto
    mappings list it as a model class: `getattr(transformers, name)` would call anything
    (`pipeline`, `set_seed`) a config file names."""
    import transformers
    from transformers.models.auto import modeling_auto

    known: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL") and attr.endswith("_MAPPING_NAMES"):
            for v in getattr(modeling_auto, attr).values():
                known.update(v if isinstance(v, tuple | list) else (v,))
    if not isinstance(name, str) or name not in known:
        raise SlimportError(
            f"architectures {name!r}: not a transformers model class",
            hint="set architectures in config.json to the model class, e.g. LlamaForCausalLM",
        )
    return getattr(transformers, name)


def model_for_config(folder: Path, config: dict) -> tuple[type, object]:
    """The model class and transformers config of a folder's config.json (its
    quantization_config left out: the caller fills the weights itself, so transformers must not
    try to quantize them again)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    try:
        cls = model_class(arch)
    except SlimportError as e:
        raise SlimportError(f"{folder / 'config.json'}: {e.message}", e.hint) from None
    rest = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        return cls, transformers.AutoConfig.for_model(**rest)
    except (ValueError, KeyError, TypeError) as e:
        raise SlimportError(
            f"{folder / 'config.json'}: cannot build a {arch} config ({e})"
        ) from None


def set_module(model, name: str, module) -> None:
    """Replace the submodule at a dotted name."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
