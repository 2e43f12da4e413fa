"""transformers' `from_pretrained` keywords, as our MindSpore `from_pretrained` understands them:
each one is used, translated, or named in one message; none is merged into the config unseen."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io.locate import resolve_model

# accepted for code written against transformers, with why they change nothing here
IGNORED = {
    "device_map": "MindSpore places the model on the device of its context "
    "(mindspore.set_context(device_target=...))",
    "trust_remote_code": "slimport never runs a repository's code; its own family rules read the weights",
    "low_cpu_mem_usage": "loading streams tensor by tensor already",
    "attn_implementation": "slimport's Cells have one attention implementation",
    "use_safetensors": "the weights file is found in the folder by its format",
}
# config attributes every transformers config has, though config.json may not list them
CONFIG_ATTRIBUTES = {
    "num_labels", "id2label", "label2id", "problem_type", "output_hidden_states",
    "output_attentions", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
}  # fmt: skip


def translate(path: str | os.PathLike, dtype, quantization_config, kwargs: dict) -> tuple:
    """(local path, dtype, the kwargs left for the config): `revision` picks a Hub revision,
    `torch_dtype` is `dtype`'s transformers name, the keywords of IGNORED are warned about once,
    and transformers' own quantization config classes are refused with what to pass instead."""
    path = resolve_model(path, kwargs.pop("revision", None))
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        name = str(torch_dtype).removeprefix("torch.")
        if name != "auto":  # transformers' "auto": the checkpoint's dtype, which float32 holds
            if dtype not in ("float32", name):
                raise SlimportError(f"torch_dtype={name!r} and dtype={dtype!r} disagree", hint="pass one: dtype")  # fmt: skip
            dtype = name
    ignored = {k: kwargs.pop(k) for k in list(kwargs) if k in IGNORED}
    ignored = {k: v for k, v in ignored.items() if v not in (None, False)}
    if ignored:
        warnings.warn(
            "from_pretrained ignores "
            + "; ".join(f"{k}={v!r} ({IGNORED[k]})" for k, v in ignored.items()),
            stacklevel=3,
        )
    if type(quantization_config).__module__.startswith("transformers"):
        raise SlimportError(
            f"quantization_config={type(quantization_config).__name__}(): transformers' class "
            "describes how a checkpoint is stored, not how to quantize one",
            hint="a compressed-tensors folder loads compressed as it is (no quantization_config); "
            "to quantize while loading pass a slimport QuantizationConfig, a recipe dict or a "
            "YAML recipe path",
        )
    return Path(path), dtype, kwargs


def check_config_kwargs(kwargs: dict, config: dict, where: str) -> None:
    """Config overrides must name an attribute of the model's config: a misspelt or foreign
    keyword (`torch_dtpye`, `cache_dir`) would otherwise sit in the config doing nothing."""
    unknown = sorted(k for k in kwargs if k not in config and k not in CONFIG_ATTRIBUTES)
    if unknown:
        raise SlimportError(
            f"from_pretrained({where}): unknown keyword(s) {', '.join(unknown)}: neither an "
            "option of from_pretrained nor an attribute of the model's config",
            hint="config attributes look like " + ", ".join(sorted(config)[:6]),
        )
