"""Structured pruning that shrinks: whole attention heads (or KV groups) and FFN channels cut out
of the matrices, and a config that says so, so the result is a smaller model plain transformers
loads (and every reader of HF folders: our converters, MindSpore).

transformers' configs hold one size for all layers, so every layer keeps the same number of
units; which ones is chosen per layer. Llama-family configs say the new head count (with
`head_dim` kept); BERT-family folders list the removed heads in `pruned_heads`, the format
transformers 4 reads (transformers 5 dropped it: `slimport.io.pruned_heads` loads them there).

Importance per unit (low = removed), one number per attention head / FFN channel:
  magnitude  the squared norm of every weight of the unit (q/k/v rows and o columns of a head;
             gate/up rows and the down column of a channel): `ln_structured` on whole units
  wanda      Wanda's |W|·‖X‖₂ on the output projection (o_proj / down_proj), summed over the
             unit's input columns, X the calibration activations (structured Wanda, as FLAP):
             what the unit adds to the residual stream on real text
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimport.compress.prune import STRUCTURES, UNITS
from slimport.errors import SlimportError
from slimport.io import pruned_heads

IMPORTANCE = ("wanda", "magnitude")
REPORT = "structured_report.json"


@dataclass(frozen=True)
class StructLayout:
    """Where one family keeps the pruned matrices (names inside a block) and their config keys."""

    blocks: str  # the ModuleList's dotted-name suffix
    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]  # the Linears producing the FFN channels
    down: str
    heads: str  # how a config says heads were removed: "head_dim" (the count) or "pruned_heads"


LLAMA = StructLayout("layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "head_dim")  # fmt: skip
BERT = StructLayout("encoder.layer", "attention.self.query", "attention.self.key",
                    "attention.self.value", "attention.output.dense", ("intermediate.dense",),
                    "output.dense", "pruned_heads")  # fmt: skip
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "bert": BERT, "roberta": BERT}


@dataclass
class Plan:
    """Which units every layer keeps (sorted original indices) and the sizes that result."""

    structure: str
    keep: list[list[int]]  # per layer: kept heads (query heads for `heads`) or channels
    keep_kv: list[list[int]] | None = None  # per layer: kept KV heads (heads only)
    sizes: dict = dataclasses.field(default_factory=dict)  # the config keys that change


def layout_of(config) -> StructLayout:
    kind = getattr(config, "model_type", None)
    if kind not in LAYOUTS:
        raise SlimportError(
            f"structured pruning of {kind!r} models is not supported",
            hint="supported: " + ", ".join(sorted(LAYOUTS)),
        )
    return LAYOUTS[kind]


def blocks(model: nn.Module, layout: StructLayout) -> nn.ModuleList:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (
            name == layout.blocks or name.endswith("." + layout.blocks)
        ):
            return m
    raise SlimportError(f"{type(model).__name__}: no `{layout.blocks}` block list found")


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head size), checked for a consistent grouping."""
    h = config.num_attention_heads
    g = getattr(config, "num_key_value_heads", None) or h
    d = getattr(config, "head_dim", None) or config.hidden_size // h
    if h % g:
        raise SlimportError(
            f"config: num_attention_heads {h} is not a multiple of num_key_value_heads {g}",
            hint="the checkpoint's GQA grouping is inconsistent; fix its config.json",
        )
    return h, g, d


def check_ratio(ratio: float, structure: str) -> None:
    if structure not in STRUCTURES:
        raise SlimportError(
            f"unknown --structured {structure!r}", hint="one of " + ", ".join(STRUCTURES)
        )
    if not 0 < ratio < 1:
        raise SlimportError(
            f"--ratio {ratio}: the share of {structure} removed must be in (0, 1)",
            hint="e.g. --ratio 0.3 removes 30% of every layer's " + structure,
        )


def _removed(n: int, ratio: float, what: str) -> int:
    """How many of n units a ratio removes: at least one, never all."""
    k = round(n * ratio)
    if k == 0:
        raise SlimportError(
            f"--ratio {ratio} removes none of the {n} {what}",
            hint=f"use a ratio >= {0.5 / n:.2g}" + (" or --unit group" if "per KV" in what else ""),
        )
    if k >= n:
        raise SlimportError(
            f"--ratio {ratio} removes all {n} {what}: the layers would have none left",
            hint=f"use a ratio < {(n - 0.5) / n:.2g}",
        )
    return k


# ------------------------------------------------------------------------------ importance
def _linear(block: nn.Module, name: str) -> nn.Linear:
    return block.get_submodule(name)


def activation_norms(model: nn.Module, batches: list[dict], layout: StructLayout, structure: str):
    """Per layer: the squared L2 norm over the calibration tokens of every input column of the
    output projection (o_proj for heads, down_proj for FFN channels). Padding is no token:
    the rows where a batch's attention_mask is 0 are left out."""
    name = layout.o if structure == "heads" else layout.down
    layers = blocks(model, layout)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    hooks, real = [], [None]  # real[0]: the current batch's attention mask

    def hook(i):
        def record(_mod, args):
            x = args[0].detach().float()
            x = x[real[0]] if real[0] is not None else x.reshape(-1, x.shape[-1])
            s = x.square().sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s

        return record

    for i, block in enumerate(layers):
        hooks.append(_linear(block, name).register_forward_pre_hook(hook(i)))
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                real[0] = None if mask is None else mask.bool()
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return sums


def importance(block: nn.Module, layout: StructLayout, structure: str, shape, sqnorm=None):
    """One score per unit of a block: query heads (`heads`) or FFN channels."""
    if structure == "ffn":
        down = _linear(block, layout.down).weight.detach().float()
        if sqnorm is not None:  # Wanda: |W_ij| * ||X_j||, summed over the channel's column
            return (down.abs() * sqnorm.sqrt().unsqueeze(0)).sum(0)
        score = down.square().sum(0)
        for name in layout.up:
            score = score + _linear(block, name).weight.detach().float().square().sum(1)
        return score
    h, g, d = shape
    o = _linear(block, layout.o).weight.detach().float()
    if sqnorm is not None:
        return (o.abs() * sqnorm.sqrt().unsqueeze(0)).sum(0).reshape(h, d).sum(1)
    score = o.square().sum(0).reshape(h, d).sum(1)
    q = _linear(block, layout.q).weight.detach().float().square().sum(1).reshape(h, d).sum(1)
    kv = sum(
        _linear(block, n).weight.detach().float().square().sum(1).reshape(g, d).sum(1)
        for n in (layout.k, layout.v)
    )
    return score + q + kv.repeat_interleave(h // g)  # a head's share of its KV group's weights


# ------------------------------------------------------------------------------ the plan
def plan(
    model: nn.Module,
    structure: str,
    ratio: float,
    unit: str = "head",
    sqnorms: list | None = None,
) -> Plan:
    """Which units each layer keeps: the highest-scoring ones, the same count in every layer."""
    check_ratio(ratio, structure)
    config = model.config
    layout = layout_of(config)
    layers = blocks(model, layout)
    if structure == "ffn":
        n = config.intermediate_size
        keep_n = n - _removed(n, ratio, "FFN channels of every layer")
        keep = []
        for i, block in enumerate(layers):
            s = importance(block, layout, "ffn", None, sqnorms[i] if sqnorms else None)
            keep.append(sorted(torch.topk(s, keep_n).indices.tolist()))
        return Plan("ffn", keep, sizes={"intermediate_size": keep_n})
    if pruned_heads.pruned_heads(config):
        raise SlimportError(
            f"{config.model_type}: this model's heads were pruned already (`pruned_heads` in "
            "its config)",
            hint="prune heads once, from the original model (FFN channels can still go)",
        )
    if unit not in UNITS:
        raise SlimportError(f"unknown --unit {unit!r}", hint="one of " + ", ".join(UNITS))
    h, g, d = shape = head_shape(config)
    r = h // g  # query heads per KV group
    if unit == "group" or r == 1:  # whole groups (MHA: a head is its own group)
        keep_g = g - _removed(
            g, ratio, "KV groups of every layer" if r > 1 else "heads of every layer"
        )
        keep_r = r
    else:
        keep_g = g
        keep_r = r - _removed(r, ratio, f"query heads per KV group ({r} per group)")
    if layout.heads == "head_dim" and config.hidden_size % (keep_g * keep_r):  # configs refuse it
        raise SlimportError(
            f"--ratio {ratio} leaves {keep_g * keep_r} attention heads, which do not divide "
            f"hidden_size {config.hidden_size}: transformers would refuse the config",
            hint="choose a ratio that leaves a divisor of hidden_size"
            + ("" if unit == "group" else ", or --unit group"),
        )
    keep, keep_kv = [], []
    for i, block in enumerate(layers):
        s = importance(block, layout, "heads", shape, sqnorms[i] if sqnorms else None).reshape(g, r)
        groups = sorted(torch.topk(s.sum(1), keep_g).indices.tolist())
        heads = [
            grp * r + j
            for grp in groups
            for j in sorted(torch.topk(s[grp], keep_r).indices.tolist())
        ]
        keep.append(heads)
        keep_kv.append(groups)
    if layout.heads == "pruned_heads":  # the count stays; the removed heads are listed
        removed = {str(i): sorted(set(range(h)) - set(k)) for i, k in enumerate(keep)}
        return Plan("heads", keep, keep_kv, {"pruned_heads": removed})
    sizes = {"num_attention_heads": keep_g * keep_r, "num_key_value_heads": keep_g, "head_dim": d}
    return Plan("heads", keep, keep_kv, sizes)


# ------------------------------------------------------------------------------ shrinking
def _rows(idx: list[int], size: int) -> torch.Tensor:
    """Row indices of units of `size` rows each."""
    return (torch.tensor(idx).unsqueeze(1) * size + torch.arange(size)).reshape(-1)


def _cut(sd: dict, name: str, rows=None, cols=None) -> None:
    w = sd[name + ".weight"]
    if rows is not None:
        w = w.index_select(0, rows)
        if name + ".bias" in sd:
            sd[name + ".bias"] = sd[name + ".bias"].index_select(0, rows).clone()
    if cols is not None:
        w = w.index_select(1, cols)
    sd[name + ".weight"] = w.clone()


def shrink(model: nn.Module, p: Plan) -> nn.Module:
    """The smaller model: `model`'s class built from the new config, holding the kept rows and
    columns. Computes what `model` computes with the removed units' outputs zeroed."""
    layout = layout_of(model.config)
    layers = blocks(model, layout)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d = head_shape(model.config)[2] if p.structure == "heads" else 1
    for i, keep in enumerate(p.keep):
        at = f"{prefix}.{i}."
        if p.structure == "ffn":
            rows = torch.tensor(keep)
            for name in layout.up:
                _cut(sd, at + name, rows=rows)
            _cut(sd, at + layout.down, cols=rows)
        else:
            heads, kv = _rows(keep, d), _rows(p.keep_kv[i], d)
            _cut(sd, at + layout.q, rows=heads)
            _cut(sd, at + layout.k, rows=kv)
            _cut(sd, at + layout.v, rows=kv)
            _cut(sd, at + layout.o, cols=heads)
    config = model.config.__class__.from_dict({**model.config.to_dict(), **p.sizes})
    small = pruned_heads.apply(type(model)(config), pruned_heads.pruned_heads(config))
    small.load_state_dict(sd)
    return small.to(next(model.parameters()).dtype).eval()


def parameters(model: nn.Module) -> int:
    return sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())


# ------------------------------------------------------------------------------ folders
def _calibration(folder: Path, model, calib_data, num_samples: int, seq_len: int, seed: int):
    from slimport.arch.layout import is_causal_lm
    from slimport.compress.calibration import calibration_inputs
    from slimport.compress.quant.config import QuantizationConfig
    from slimport.io.hf import load_tokenizer

    config = QuantizationConfig.from_dict(
        {
            "num_samples": num_samples,
            "seq_len": seq_len,
            "seed": seed,
            "calib_data": str(calib_data),
        }
    )
    causal = is_causal_lm(model.config.to_dict())
    return calibration_inputs(load_tokenizer(folder), calib_data, config, causal)


def load(folder: str | Path):
    """The HF folder's model class (its config's `architectures`), in float32."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SlimportError(
            f"{folder}: structured pruning reads a Hugging Face folder (config.json + weights)",
            hint=f"convert it first: slimport convert {folder} {folder.name}-hf --to hf",
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    layout_of(config)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch or "", None) or transformers.AutoModel
    return pruned_heads.from_pretrained(cls, folder, dtype=torch.float32)


def prune_structured(
    model: str | Path,
    out: str | Path,
    structure: str,
    ratio: float,
    method: str = "wanda",
    unit: str = "head",
    calib_data: str | Path | None = None,
    num_samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Remove `ratio` of every layer's heads or FFN channels of the HF folder `model`; write the
    smaller model (same dtype, tokenizer and other files copied) to `out`. Returns the report."""
    import json

    from slimport.io.base import atomic_dir

    check_ratio(ratio, structure)
    if method not in IMPORTANCE:
        raise SlimportError(
            f"unknown importance {method!r} for structured pruning",
            hint="one of " + ", ".join(IMPORTANCE),
        )
    if method == "wanda" and not calib_data:
        raise SlimportError(
            "wanda importance needs calibration text",
            hint="pass --calib-data FILE, or --method magnitude",
        )
    t0 = time.perf_counter()
    src = Path(model)
    net = load(src)
    dtype = (
        net.config.dtype if isinstance(getattr(net.config, "dtype", None), torch.dtype) else None
    )
    sq = None
    if method == "wanda":
        batches = _calibration(src, net, calib_data, num_samples, seq_len, seed)
        sq = activation_norms(net, batches, layout_of(net.config), structure)
    p = plan(net, structure, ratio, unit, sq)
    small = shrink(net, p)
    report = {
        "structure": structure,
        "ratio": ratio,
        "importance": method,
        "unit": unit if structure == "heads" else None,
        "calib_data": str(calib_data) if calib_data else None,
        "sizes_before": {k: getattr(net.config, k, None) for k in p.sizes},
        "sizes_after": p.sizes,
        "parameters_before": parameters(net),
        "parameters_after": parameters(small),
        "kept": p.keep,
        "kept_kv": p.keep_kv,
    }
    del net
    with atomic_dir(Path(out), overwrite=overwrite, source=src) as tmp:
        small.to(dtype or torch.float32).save_pretrained(tmp)
        for f in src.iterdir():  # tokenizer, chat template, ...: everything but weights/config
            if f.is_file() and not (tmp / f.name).exists() and not _weights(f.name):
                shutil.copy2(f, tmp / f.name)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".gguf", ".index.json")) or name.endswith(
        "_report.json"
    )


def summary(report: dict) -> str:
    b, a = report["sizes_before"], report["sizes_after"]
    if "pruned_heads" in a:  # BERT family: the removed heads are listed, the count stays
        removed = a["pruned_heads"]
        n = len(next(iter(removed.values())))
        sizes = f"{n} heads removed from each of {len(removed)} layers (config `pruned_heads`)"
    else:
        sizes = ", ".join(f"{k} {b[k]} -> {a[k]}" for k in a if b.get(k) != a[k])
    pb, pa = report["parameters_before"], report["parameters_after"]
    return (
        f"{report['structure']} pruned by {report['importance']} importance (ratio {report['ratio']}): "
        f"{sizes}; parameters {pb / 1e6:,.2f} M -> {pa / 1e6:,.2f} M ({1 - pa / pb:.1%} fewer) "
        f"in {report['seconds']:.1f} s"
    )
