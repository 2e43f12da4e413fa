"""THE compressed-tensors folder writer, for the block-by-block pipeline and for in-memory models.

One set of rules: QuantLinears are written as compressed-tensors entries (quant/compressed.py),
everything else as is (a float Linear that was a Conv1D back in Conv1D's [in, out] layout);
`ignore` lists the model's Linears left in float; a float head tied to the embeddings is not
stored twice, a quantized one unties it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from slimport.compress.quant import compressed
from slimport.compress.quant.config import QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.skeleton import CONV1D, FROM_CONV1D, join, tied_head
from slimport.errors import SlimportError
from slimport.io import safetensors
from slimport.io.auto import tokenizer_files
from slimport.io.base import Ready, atomic_dir

RECIPE_FILE = compressed.RECIPE_FILE
PARTS = "parts"  # inside the atomic_dir only: blocks as written, before sharding by size


def module_tensors(module: nn.Module, prefix: str, qconfig: QuantizationConfig) -> list[Ready]:
    """A module's checkpoint entries: compressed-tensors entries for QuantLinears, the rest as is."""
    out: dict[str, torch.Tensor] = {}
    qnames = set()
    for n, m in module.named_modules():
        if isinstance(m, QuantLinear):
            qnames.add(n)
            out.update(compressed.linear_tensors(join(prefix, n), m, qconfig))
    conv = {n for n, m in module.named_modules() if getattr(m, FROM_CONV1D, False)}
    for n, t in module.state_dict().items():
        owner, _, leaf = n.rpartition(".")
        if owner in qnames:
            continue
        if owner in conv and leaf == "weight":
            t = t.T  # float, so back in the layout the model class holds: Conv1D's [in, out]
        out.setdefault(join(prefix, n), t.detach())  # written before the module is freed
    return [Ready(n, t.contiguous()) for n, t in out.items()]


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of a model, a Conv1D as the Linear it computes: name -> [out, in]."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[n] = tuple(m.weight.shape)
        elif type(m).__name__ == CONV1D:
            out[n] = tuple(m.weight.shape[::-1])
        elif isinstance(m, QuantLinear):
            out[n] = (m.out_features, m.in_features)
    return out


def ignore_list(reference: nn.Module, quantized: dict[str, tuple[int, int]]) -> list[str]:
    """The Linears of `reference` (the model class as built, meta is fine) left in float, after
    checking every quantized module (name -> [out, in]) stands where the class has a Linear (or
    a Conv1D, its transpose) of that shape."""
    linears = linear_shapes(reference)
    for name, shape in quantized.items():
        if linears.get(name) != shape:
            what = (
                "absent"
                if name not in dict(reference.named_modules())
                else type(reference.get_submodule(name)).__name__
            )
            raise SlimportError(
                f"{name}: compressed-tensors stores quantized Linear modules, but in "
                f"{type(reference).__name__} this module is {what}",
                hint="leave it unquantized (add it to `protect`)",
            )
    return sorted(
        n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n not in quantized
    )


def config_json(
    config: dict,
    qconfig: QuantizationConfig,
    ignore: list[str],
    tied: dict[str, str],
    written: set[str],
    sparsity: dict | None = None,
) -> dict:
    """config.json of the quantized model: the model's config + the compressed-tensors block.
    A tied head that was quantized (its float weight is not among the `written` names) can no
    longer share the embedding's float matrix."""
    cfg = dict(config)
    if (
        tied
        and cfg.get("tie_word_embeddings", False)
        and any(f"{h.rpartition('.')[0]}.weight_scale" in written for h in tied)
    ):
        cfg["tie_word_embeddings"] = False
    if qconfig.quantizes:  # pruned only: an ordinary float folder
        quantized = [
            n.removesuffix(".weight_scale") for n in written if n.endswith(".weight_scale")
        ]
        cfg["quantization_config"] = compressed.quantization_config(
            qconfig, ignore, sparsity, quantized
        )
    return cfg


class FolderWriter:
    """Writes a compressed-tensors folder into `tmp` (an atomic_dir): one part file per block as
    it is quantized, then shards by size (transformers' `max_shard_size`), then the rest."""

    def __init__(
        self,
        tmp: Path,
        qconfig: QuantizationConfig,
        tied: dict[str, str],
        max_shard_size: int | str = safetensors.MAX_SHARD_SIZE,
    ) -> None:
        self.tmp, self.qconfig, self.tied = tmp, qconfig, tied
        self.max_shard_size = safetensors.shard_bytes(max_shard_size)  # refused before any work
        self.parts: dict[int, Path] = {}
        self.written: set[str] = set()
        self.files: list[str] = []

    def part(self, order: int, tensors: list[Ready]) -> None:
        """Write one block's tensors now (its memory is freed next); `order` places them in the
        shards (0: embeddings and heads, then the blocks)."""
        tensors = [t for t in tensors if t.name not in self.written]
        (self.tmp / PARTS).mkdir(exist_ok=True)
        path = self.tmp / PARTS / f"{order:06d}.safetensors"
        safetensors.write(path, sorted(tensors, key=lambda t: t.name))
        self.parts[order] = path
        self.written.update(t.name for t in tensors)

    def untied(self, tensors: list[Ready]) -> list[Ready]:
        """Drop a float head tied to the embeddings: transformers re-ties it on load. (A quantized
        one stays: its `weight` of the int-quantized format is integers.)"""
        names = {t.name for t in tensors}
        quantized = {h for h in self.tied if f"{h.rpartition('.')[0]}.weight_scale" in names}
        return [t for t in tensors if t.name not in self.tied or t.name in quantized]

    def finish(self, config: dict, ignore: list[str], sparsity: dict | None = None) -> None:
        if self.parts:
            parts = [self.parts[k] for k in sorted(self.parts)]
            self.files = safetensors.reshard(parts, self.tmp, self.max_shard_size)
            (self.tmp / PARTS).rmdir()
        cfg = config_json(config, self.qconfig, ignore, self.tied, self.written, sparsity)
        (self.tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (self.tmp / RECIPE_FILE).write_text(json.dumps(self.qconfig.to_dict(), indent=2) + "\n")

    def bytes(self) -> int:
        return sum((self.tmp / f).stat().st_size for f in self.files if f.endswith(".safetensors"))


def save_quantized(
    model: nn.Module,
    folder: str | Path,
    qconfig: QuantizationConfig,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = safetensors.MAX_SHARD_SIZE,
) -> dict:
    """A quantized transformers model (`pipeline.quantize_`) -> a compressed-tensors Hugging
    Face folder, atomically, with the same writer the block-by-block pipeline uses."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise SlimportError(
            "the model has no quantized Linear modules to save", hint="quantize it first"
        )
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise SlimportError("save_quantized needs a transformers model (with a .config)")
    tok = []
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise SlimportError(f"{tokenizer_dir}: tokenizer folder not found")
        tok = tokenizer_files(Path(tokenizer_dir))
    try:  # the class as transformers builds it: where compressed-tensors will look for Linears
        with torch.device("meta"):
            reference = type(model)(copy.deepcopy(model.config))
    except Exception:  # an exotic class we cannot rebuild: trust the model as it is
        reference = model
    ignore = ignore_list(
        reference, {n: (m.out_features, m.in_features) for n, m in quantized.items()}
    )
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    tied = tied_head(model, config.get("tie_word_embeddings", False))
    quantized_bytes = sum(
        m.weight.numel() * 4 + (0 if m.bias is None else m.bias.numel() * 4)
        for m in quantized.values()
    )
    with atomic_dir(Path(folder)) as tmp:
        writer = FolderWriter(tmp, qconfig, tied, max_shard_size)
        tensors = writer.untied(module_tensors(model, "", qconfig))
        files = safetensors.write_sharded(
            tmp, sorted(tensors, key=lambda t: t.name), max_shard_size
        )
        writer.written.update(t.name for t in tensors)
        writer.finish(config, ignore)
        for f in tok:
            (tmp / f.name).write_bytes(f.read_bytes())
    floats = [t.value for t in tensors if t.name.rpartition(".")[0] not in quantized]
    return {
        # the fp32 bytes the written tensors stand for: a QuantLinear its float weight and bias
        "bytes_before": quantized_bytes
        + sum(v.numel() * 4 if v.is_floating_point() else v.nbytes for v in floats),
        "bytes_after": sum(t.value.nbytes for t in tensors),
        "quantized_linears": len(quantized),
        "format": compressed.checkpoint_format(qconfig),
        "files": [*files, "config.json", RECIPE_FILE, *(f.name for f in tok)],
    }
