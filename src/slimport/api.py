"""Public Python API; the `slimport` command is a thin shell over these functions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from slimport import arch
from slimport.convert import engine
from slimport.convert.loader import DTYPES, TARGETS, Job, Model, convert, load, model_config, nbytes
from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint

__all__ = ["DTYPES", "TARGETS", "Job", "Model", "convert", "inspect", "load", "model_config"]


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
