"""The hub loader: any checkpoint read through its family's rules into hub tensors (`load`),
and `convert`, which lays them out in a target dialect and writes them with the format's writer.
The public functions are re-exported by slimport.api."""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from slimport import arch
from slimport.arch.rules import Family
from slimport.convert import engine
from slimport.convert.mapping import apply_mapping, load_mapping, renamed_view
from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint
from slimport.io.base import Checkpoint, atomic_dir
from slimport.io.formats import CAST_DTYPES, EXPORTS, TARGETS, TO_CHOICES

DTYPES = {name: getattr(torch, name) for name in CAST_DTYPES}  # --dtype


@dataclass
class Job:
    """Everything a writer needs besides the tensors."""

    family: Family
    config: dict  # Hugging Face config.json content of the model
    cfg: dict  # normalised config (derived keys added)
    source: Checkpoint
    dialect: str
    dtype: torch.dtype | None = None
    options: dict = field(default_factory=dict)  # writer-specific (e.g. gguf tensor type)
    notes: list[str] = field(default_factory=list)  # what the writer chose, for the report


@dataclass
class Model:
    """A checkpoint read through its family's rules into hub tensors (nothing loaded yet)."""

    source: Checkpoint
    family: Family
    config: dict
    cfg: dict
    dialect: str
    hub: dict[str, engine.Planned]
    ignored: list[str]
    notes: list[str]


def model_config(ckpt: Checkpoint) -> dict | None:
    """The HF config of a checkpoint: config.json, or translated from the format's metadata."""
    if ckpt.config is not None:
        if "inferred_config" in ckpt.metadata:  # an exported graph: the class it computes
            shapes = {n: i.shape for n, i in ckpt.infos.items()}
            return arch.fit_config(ckpt.config, shapes, str(ckpt.path))
        return ckpt.config
    if ckpt.format == "gguf":
        gguf_arch = ckpt.metadata.get("general.architecture")
        family = arch.family_for(gguf_arch, where=f"{ckpt.path} (GGUF general.architecture)")
        if "gguf" not in family.config_from:
            raise SlimportError(
                f"{ckpt.path}: reading {gguf_arch!r} GGUF files is not supported yet"
            )
        try:
            return family.config_from["gguf"]({**ckpt.metadata, "__tensors__": list(ckpt.infos)})
        except SlimportError as e:  # name the file: the translation sees only the metadata
            if str(ckpt.path) in e.message:
                raise
            raise SlimportError(f"{ckpt.path}: {e.message}", e.hint) from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise SlimportError(
                f"{ckpt.path}: GGUF metadata for {gguf_arch!r} is missing or malformed ({e!r})"
            ) from None
    if "inferred_config" in ckpt.metadata:  # an exported graph: config from shapes and constants
        shapes = {n: i.shape for n, i in ckpt.infos.items()}
        return arch.guess_config(ckpt.metadata["inferred_config"], shapes, str(ckpt.path))
    return None


def load(
    path: str | Path,
    from_format: str | None = None,
    config: str | Path | None = None,
    mapping: dict[str, str] | str | Path | None = None,
    ignore_mismatched_sizes: bool = False,
    allow_missing: tuple[str, ...] = (),
    integer_linears: bool = False,
) -> Model:
    """Open `path` and plan it into hub tensors, strictly (see convert.engine).

    A compressed-tensors folder reads as its dequantized float weights; one whose activations
    are quantized too is refused unless `integer_linears` says the caller computes each
    quantized Linear from `source.quantized` (as the MindSpore runtime does)."""
    ckpt = open_checkpoint(path, from_format, config)
    if "quantized_activations" in ckpt.metadata and not integer_linears:
        ckpt.close()
        raise SlimportError(
            f"{ckpt.path}: its activations are quantized too "
            f"({ckpt.metadata['quantized_activations']}), which float weights cannot carry",
            hint="run it with load_quantized (torch) or slimport.mindspore's from_pretrained "
            "(integer weights), or quantize weight-only to take it to another format",
        )
    renamed = {}
    if mapping is not None:
        mapping = mapping if isinstance(mapping, dict) else load_mapping(mapping)
        ckpt, renamed = apply_mapping(ckpt, mapping)
    raw = model_config(ckpt)
    family, cfg = arch.resolve(raw, str(ckpt.path))
    candidates = [d for d in ckpt.dialects if d in family.dialects]
    if mapping is not None:  # a mapping may target any dialect of the family, the hub first
        candidates += [d for d in family.dialects if d not in candidates]
    if not candidates:
        raise SlimportError(
            f"{ckpt.path}: {family.name} models cannot be read from {ckpt.format} files"
        )
    dialect = max(candidates, key=lambda d: engine.dialect_score(ckpt, family, d, cfg))
    ckpt, prefixed = _add_base_prefix(ckpt, cfg, dialect)
    hub, ignored, notes = engine.to_hub(
        ckpt, family, dialect, cfg, ignore_mismatched_sizes, allow_missing
    )
    if renamed:
        notes.append(f"user mapping renamed {len(renamed)} tensor(s)")
    if prefixed:
        notes.append(f"the checkpoint stores the bare base model: read with prefix {prefixed!r}")
    if ckpt.metadata.get("graph_named"):
        notes.append(
            f"{len(ckpt.metadata['graph_named'])} anonymous ONNX initializer(s) named after the "
            f"modules using them; {len(ckpt.metadata['graph_transposed'])} MatMul weight(s) "
            "stored [in, out] read transposed to [out, in]"
        )
    if "graph_tied" in ckpt.metadata:
        notes.append(f"{ckpt.metadata['graph_tied']} is the embedding transposed: tied")
    if ckpt.config is None and "inferred_config" in ckpt.metadata:
        notes.append("config inferred from the ONNX graph (pass --config to override)")
    elif changed := sorted(k for k in raw if ckpt.config and raw[k] != ckpt.config.get(k)):
        fitted = ", ".join(f"{k}={raw[k]!r}" for k in changed)
        notes.append(f"config fitted to the class the ONNX graph computes: {fitted}")
    if "dequantized_from" in ckpt.metadata:
        notes.append(f"weights dequantized from {ckpt.metadata['dequantized_from']}")
    return Model(ckpt, family, dict(raw), cfg, dialect, hub, ignored + ckpt.skipped, notes)


def _add_base_prefix(ckpt: Checkpoint, cfg: dict, dialect: str) -> tuple[Checkpoint, str]:
    """Read a bare base-model checkpoint under a head-model config, as transformers does.

    The official GPT-2 checkpoint says GPT2LMHeadModel but stores `h.0.attn...` without the
    `transformer.` prefix: prefix every name so the hub stays canonical for the class.
    """
    base = cfg.get("base")
    if dialect != "hf" or not base or any(n.startswith(base) for n in ckpt.infos):
        return ckpt, ""
    return renamed_view(ckpt, {base + n: n for n in ckpt.infos}), base


def convert(
    src: str | Path,
    out: str | Path,
    to: str,
    from_format: str | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | Path | None = None,
    mapping: dict[str, str] | str | Path | None = None,
    ignore_mismatched_sizes: bool = False,
    allow_missing: tuple[str, ...] = (),
    options: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Convert a checkpoint into folder `out` in the `to` layout; returns the report dict.

    A non-empty `out` is refused unless `overwrite` (then it is replaced as a whole)."""
    t0 = time.perf_counter()
    if to in EXPORTS:  # a graph: built above this layer
        raise SlimportError(f"--to {to} builds a graph: use slimport.api.convert (or `slimport convert`)")  # fmt: skip
    if to not in TARGETS:
        raise SlimportError(f"unknown --to target {to!r}", hint="one of: " + ", ".join(TO_CHOICES))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SlimportError(f"unknown --dtype {dtype!r}", hint="one of: " + ", ".join(DTYPES))
        dtype = DTYPES[dtype]
    model = load(src, from_format, config, mapping, ignore_mismatched_sizes, allow_missing)
    try:
        return write(model, model.hub, out, to, dtype, options, progress, overwrite, [src], t0)
    finally:
        model.source.close()


def write(
    model: Model,
    hub: dict[str, engine.Planned],
    out: str | Path,
    to: str,
    dtype: torch.dtype | None = None,
    options: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    sources: list[str | Path] = (),
    t0: float | None = None,
    extra: dict | None = None,
) -> dict:
    """Lay `hub` tensors (planned, e.g. `model.hub` or merged from several models) out as the
    `to` target and write them into folder `out` atomically, with `model`'s config and
    tokenizer; `sources` are refused as output folders. `extra` is added to the report once
    every tensor is written (a merge fills in what it saw). Returns the report dict."""
    t0 = time.perf_counter() if t0 is None else t0
    if to not in TARGETS:
        raise SlimportError(f"unknown --to target {to!r}", hint="one of: " + ", ".join(TARGETS))
    dialect, writer = TARGETS[to]
    if dialect not in model.family.dialects:
        raise SlimportError(f"--to {to}: {model.family.name} models have no '{dialect}' layout")
    if model.cfg.get("pruned_heads") and dialect not in ("hf",):
        raise SlimportError(  # GGUF metadata and our MindSpore Cells size every layer alike
            f"--to {to}: this model's heads were pruned per layer (`pruned_heads` in its config), "
            f"which the {dialect} layout cannot say",
            hint="export it --to onnx or keep it as HF safetensors; or prune FFN channels only",
        )
    tensors = engine.from_hub(hub, model.family, dialect, model.cfg, dtype)
    job = Job(model.family, model.config, model.cfg, model.source, dialect, dtype, options or {})
    total = sum(nbytes(t) for t in tensors)
    out = Path(out)
    for src in sources[1:]:  # atomic_dir checks the first
        if Path(src).resolve().is_relative_to(out.resolve()):
            raise SlimportError(
                f"{out}: the output folder holds the input {src}; writing it would destroy it",
                hint="choose a new output folder",
            )
    with (
        atomic_dir(out, overwrite, source=Path(sources[0]) if sources else None) as tmp,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"to {to}",
            disable=not progress or None,
        ) as bar,
    ):
        files = importlib.import_module(writer).write_model(tmp, tensors, job, progress=bar.update)
        model.notes += job.notes
        report = _report(model, to, dialect, tensors, files, dtype, time.perf_counter() - t0)
        report.update(extra or {})
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def nbytes(t) -> int:
    """Bytes of a tensor described by .shape and .dtype (a TensorInfo, a Planned tensor)."""
    n = t.dtype.itemsize
    for d in t.shape:
        n *= d
    return n


def _report(model: Model, to, dialect, tensors, files, dtype, seconds) -> dict:
    return {
        "source": str(model.source.path),
        "source_format": model.source.format,
        "source_dialect": model.dialect,
        "family": model.family.name,
        "model_type": model.cfg["model_type"],
        "target": to,
        "target_dialect": dialect,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "files": files,
        "tensor_count": len(tensors),
        "parameter_count": sum(nbytes(t) // t.dtype.itemsize for t in tensors),
        "ignored_source_tensors": model.ignored,
        "notes": model.notes,
        "seconds": round(seconds, 3),
        "tensors": [
            {
                "target": t.name,
                "sources": list(t.sources),
                "ops": list(t.ops),
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
            }
            for t in tensors
        ],
    }
