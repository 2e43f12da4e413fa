"""Public Python API; the `slimport` command is a thin shell over these functions."""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

from slimport import arch
from slimport.compress.prune import REPORT as PRUNE_REPORT
from slimport.convert import engine, loader
from slimport.convert.loader import DTYPES, TARGETS, Job, Model, load, model_config, nbytes
from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint
from slimport.io.formats import EXPORTS

__all__ = [
    "DTYPES",
    "EXPORTS",
    "TARGETS",
    "Job",
    "Model",
    "convert",
    "inspect",
    "load",
    "model_config",
]


def convert(src: str | Path, out: str | Path, to: str, **options) -> dict:
    """Convert a checkpoint into folder `out`; returns the report dict. `to` is a layout
    (`TARGETS`: the hub loader's `convert`, same options) or a graph format (`EXPORTS`, e.g.
    "onnx": its exporter builds the graph; `options` go to it, the writer options flattened)."""
    if to == "gguf" and Path(out).suffix.lower() == ".gguf":
        return _to_gguf_file(src, Path(out), **options)
    if to not in EXPORTS:
        return loader.convert(src, out, to, **options)
    options.pop("progress", None)  # exporters build in memory: nothing to stream
    options.update(options.pop("options", None) or {})
    return importlib.import_module(EXPORTS[to]).export(src, out, **options)


def _to_gguf_file(src: str | Path, out: Path, overwrite: bool = False, **options) -> dict:
    """`--to gguf OUT.gguf` names the file itself, as llama.cpp's tools do: the conversion runs
    into a temp folder beside it and its model.gguf is renamed to OUT (the report is returned,
    not written)."""
    if out.is_dir():
        raise SlimportError(f"{out}: is a folder", hint="name a new .gguf file, or a folder without the suffix")  # fmt: skip
    if out.exists() and not overwrite:
        raise SlimportError(f"{out}: exists", hint="pass --overwrite to replace it")
    if out.exists() and out.resolve() == Path(src).resolve():
        raise SlimportError(f"{out}: is the input; writing it would destroy it", hint="name a new file")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f".{out.name}.", suffix=".partial", dir=out.parent
    ) as tmp:
        report = loader.convert(src, Path(tmp) / "model", "gguf", **options)
        os.replace(Path(tmp) / "model" / "model.gguf", out)
    return {**report, "files": [out.name]}


CONFIG_SUMMARY = (
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
    "rope_theta", "rms_norm_eps", "layer_norm_eps", "hidden_act", "tie_word_embeddings",
)  # fmt: skip


def inspect(
    path: str | Path, from_format: str | None = None, config: str | Path | None = None
) -> dict:
    """What a checkpoint holds: format, architecture, tensors, parameters, dtypes, bytes, config."""
    ckpt = open_checkpoint(path, from_format, config)
    with ckpt:
        info = {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "tensor_count": len(ckpt.infos),
            "parameter_count": ckpt.num_parameters,
            "bytes": sum(nbytes(i) for i in ckpt.infos.values()),
            "dtypes": dict(
                Counter(str(i.dtype).removeprefix("torch.") for i in ckpt.infos.values())
            ),
            "skipped": ckpt.skipped,
        }
        if "gguf_types" in ckpt.metadata:
            info["gguf_types"] = ckpt.metadata["gguf_types"]
            info.update(_gguf_summary(ckpt))
        if ckpt.quantized:
            info.update(_quantized_summary(ckpt))
        if _pruned(ckpt):
            info["sparsity"] = _sparsity_summary(ckpt)
        try:
            raw = model_config(ckpt)
            family, cfg = arch.resolve(raw, str(ckpt.path))
            dialect = max(
                (d for d in ckpt.dialects if d in family.dialects),
                key=lambda d: engine.dialect_score(ckpt, family, d, cfg),
                default=None,
            )
            info.update(family=family.name, dialect=dialect)
            info["config"] = {k: raw[k] for k in CONFIG_SUMMARY if k in raw}
        except SlimportError as e:
            info.update(family=None, architecture_error=e.message)
    return info


def _quantized_summary(ckpt) -> dict:
    """A compressed-tensors folder as stored: the scheme, which modules hold integers and what
    they cost in bytes and bits per parameter (the view's `infos` are the float equivalents)."""
    q = ckpt.quantized
    weights = {f"{n}.weight" for n in q}
    params = sum(lin.shape[0] * lin.shape[1] for lin in q.values())
    packed = sum(lin.stored_bytes for lin in q.values())
    floats = {n: i for n, i in ckpt.infos.items() if n not in weights}
    float_bytes = sum(nbytes(i) for i in floats.values())
    kinds = Counter(n.rsplit(".", 1)[-1] for n in q)
    schemes = Counter(lin.scheme for lin in q.values())
    dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in floats.values())
    return {
        "bytes": packed + float_bytes,
        "dtypes": {**dict(dtypes), **{f"{s} packed": n for s, n in schemes.items()}},
        "quantization": {
            "scheme": "; ".join(schemes),  # a mixed-precision folder: each of its schemes
            "stored_as": ckpt.metadata.get("dequantized_from", ""),
            "quantized_linears": len(q),
            "quantized_parameters": params,
            "packed_bytes": packed,
            "bits_per_parameter": round(8 * packed / params, 3),
            "modules": dict(sorted(kinds.items())),
            "ignored": ckpt.metadata.get("ignored", []),  # the Linears left in float
            "float_parameters": sum(_numel(i) for i in floats.values()),
            "float_bytes": float_bytes,
            "bits_per_parameter_overall": round(
                8 * (packed + float_bytes) / ckpt.num_parameters, 3
            ),
        },
    }


def _gguf_summary(ckpt) -> dict:
    """A GGUF file as stored: bytes per ggml type and bits per parameter (the reader's `infos`
    are the float32 tensors it dequantizes to)."""
    by_type = ckpt.metadata["gguf_type_bytes"]
    stored = sum(by_type.values())
    return {
        "bytes": stored,
        "dtypes": dict(ckpt.metadata["gguf_types"]),
        "quantization": {
            "bytes_by_type": dict(by_type),
            "bits_per_parameter": round(8 * stored / max(ckpt.num_parameters, 1), 3),
        },
    }


def _pruned(ckpt) -> bool:
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return (folder / PRUNE_REPORT).is_file()


def _sparsity_summary(ckpt) -> dict:
    """Zero fraction of the 2-D weights, per module group (layers merged: `mlp.down_proj`),
    read as the model computes them (a quantized Linear's dequantized weight)."""
    zeros: Counter = Counter()
    sizes: Counter = Counter()
    for name, i in ckpt.infos.items():
        if len(i.shape) != 2 or not name.endswith(".weight") or not i.dtype.is_floating_point:
            continue
        group = re.sub(r"^.*?\.\d+\.", "", name.removesuffix(".weight"))
        w = ckpt.load(name)
        zeros[group] += int((w == 0).sum())
        sizes[group] += w.numel()
    total = sum(sizes.values()) or 1
    return {
        "overall": round(sum(zeros.values()) / total, 4),
        **{g: round(zeros[g] / sizes[g], 4) for g in sizes},
    }


def _numel(info) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n
