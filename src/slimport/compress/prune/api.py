"""`slimport prune` as a function: options or a recipe -> one QuantizationConfig whose modifiers
prune (and, with `bits`, then quantize the kept weights) -> the block-by-block pipeline."""

from __future__ import annotations

from pathlib import Path

from slimport.compress import api as compress_api
from slimport.compress.prune import PRUNE_METHODS, QUANT_METHODS
from slimport.compress.quant.config import QuantizationConfig
from slimport.errors import SlimportError

# options of the pruning modifier itself; the rest go to the QuantizationConfig
PRUNE_OPTIONS = ("sparsity", "pattern", "ignore", "per_module")


def make_config(
    recipe: str | Path | dict | QuantizationConfig | None = None,
    method: str | None = None,
    bits: int | None = None,
    quant_method: str | None = None,
    **options,
) -> QuantizationConfig:
    """A pruning recipe: `recipe` (YAML, dict, config: it must hold a pruning modifier), or
    `method` + `sparsity`/`pattern`/`ignore`/`per_module`. With `bits` the kept weights are then
    quantized by `quant_method` (gptq, default; or rtn); group_size etc. as for quantize.
    Everything is validated here, before any model is read."""
    prune = {k: options.pop(k) for k in PRUNE_OPTIONS if options.get(k) is not None}
    if recipe is not None:
        if method or prune or quant_method:
            raise SlimportError(
                "give the pruning either as --recipe or as --method/--sparsity/--pattern, not both",
                hint="put the pruning options into the recipe's `modifiers:`",
            )
        config = compress_api.make_config(
            recipe, **({"bits": bits} if bits is not None else {}), **options
        )
        if config.pruning is None:
            raise SlimportError(
                f"recipe {recipe if not isinstance(recipe, QuantizationConfig) else ''}: "
                "it has no pruning modifier",
                hint="add one of " + ", ".join(PRUNE_METHODS) + " to `modifiers:`, or use "
                "`slimport quantize` for quantization alone",
            )
        return config
    method = method or "sparsegpt"
    if method not in PRUNE_METHODS:
        raise SlimportError(
            f"unknown pruning method {method!r}", hint="one of " + ", ".join(PRUNE_METHODS)
        )
    if quant_method is not None and bits is None:
        raise SlimportError(f"--quant-method {quant_method} needs --bits (4 or 8)")
    if quant_method is not None and quant_method not in QUANT_METHODS:
        raise SlimportError(
            f"unknown --quant-method {quant_method!r}", hint="one of " + ", ".join(QUANT_METHODS)
        )
    mods: list = [{method: prune}]
    if bits is not None:
        mods.append(quant_method or "gptq")
        options["bits"] = bits
    elif options.keys() & {"group_size", "granularity", "symmetric"}:
        raise SlimportError("weight grid options (--group-size ...) need --bits")
    if options.get("group_size") and "granularity" not in options:
        options["granularity"] = "group"
    return QuantizationConfig.from_dict({**options, "modifiers": mods})


def prune(
    model: str | Path,
    out: str | Path,
    recipe: str | Path | dict | QuantizationConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **options,
) -> dict:
    """Prune `model` into the folder `out`: a float Hugging Face folder, or with `bits` a
    compressed-tensors folder of the quantized kept weights. Returns the report."""
    config = make_config(recipe, **options)
    return compress_api.quantize(model, out, config, progress=progress, overwrite=overwrite)


def summary(report: dict) -> str:
    """The per-module table (sparsity, stored zeros, error, seconds) and the totals."""
    cfg = QuantizationConfig.from_dict(report["config"])
    rows = [r for r in report["modules"] if "sparsity" in r]
    total = sum(r["size"] for r in rows) or 1
    pruned = sum(r["sparsity"] * r["size"] for r in rows)
    m = cfg.pruning
    what = f"{m.name} {m.pattern}" + (f" + W{cfg.bits} {cfg.method.split('+')[-1].upper()}"
                                      if cfg.quantizes else "")  # fmt: skip
    lines = [
        "| module | sparsity | zeros stored | error | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in report["modules"]:
        err = r.get("prune_err", r.get("output_err"))
        lines.append(
            f"| {r['module']} | {r.get('sparsity', 0):.4f} | "
            f"{r.get('zeros', r.get('sparsity', 0)):.4f} | "
            f"{'-' if err is None else f'{err:.3g}'} | {r['seconds']:.2f} |"
        )
    before, after = report["bytes_before"], report["bytes_after"]
    lines += [
        "",
        f"{what}: {len(rows)} Linear layers, {pruned / total:.2%} of their weights pruned; "
        f"{len(report['protected_linears'])} kept dense ({', '.join(report['protected_linears'][:4])})",
        f"model bytes {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB in {report['seconds']:.1f} s "
        "(error: SparseGPT's OBS loss, or GPTQ's, per row)",
    ]
    return "\n".join(lines)
