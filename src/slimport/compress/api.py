"""`slimport quantize` as a function: recipe + options -> calibration data -> pipeline -> report."""

from __future__ import annotations

from pathlib import Path

from slimport.arch.layout import is_causal_lm
from slimport.compress import pipeline
from slimport.compress.calibration import calibration_inputs
from slimport.compress.quant.config import QuantizationConfig, ours, read_recipe
from slimport.convert.loader import model_config
from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint
from slimport.io.hf import load_tokenizer
from slimport.io.safetensors import MAX_SHARD_SIZE

# command-line options that map one-to-one onto QuantizationConfig fields
CLI_OPTIONS = (
    "bits", "method", "group_size", "granularity", "symmetric", "activations", "act_symmetric", "observer",
    "weight_observer", "smoothquant", "calib_data", "num_samples", "seq_len", "seed", "protect",
    "gguf_compatible",
)  # fmt: skip


def make_config(
    recipe: str | Path | dict | QuantizationConfig | None = None, **options
) -> QuantizationConfig:
    """A recipe (YAML file, dict in our or the seeds' form, or a config) with options on top.
    Options the recipe leaves unset keep their defaults' logic (`bits=4` on an 8-bit recipe
    without `symmetric` gets the 4-bit default)."""
    if isinstance(recipe, QuantizationConfig):
        base = recipe.to_dict()
    elif isinstance(recipe, dict):
        base = ours(recipe)
        QuantizationConfig.from_dict(base)  # the recipe alone must be valid
    elif recipe is not None:
        QuantizationConfig.from_yaml(recipe)  # the recipe alone must be valid (errors name it)
        base = ours(read_recipe(recipe))
    else:
        base = {}
    if options.keys() & {"method", "smoothquant", "gptq", "awq"}:
        base.pop("modifiers", None)  # the options' flat spelling of the algorithms wins
    if options.get("group_size") and "granularity" not in options:
        options["granularity"] = "group"
    return QuantizationConfig.from_dict({**base, **options})


def quantize(
    model: str | Path,
    out: str | Path,
    recipe: str | Path | dict | QuantizationConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    **options,
) -> dict:
    """Quantize `model` into the compressed-tensors folder `out`; returns the report. A
    non-empty `out` is refused unless `overwrite` (then it is replaced as a whole). The weights
    are sharded by size as transformers does (`max_shard_size`: bytes or e.g. "500MB")."""
    config = make_config(recipe, **options)
    calibration = None
    if config.needs_calibration:
        if not config.calib_data:
            raise SlimportError(
                f"this recipe ({_describe(config)}) calibrates on data, and no calib_data was given",
                hint="pass --calib-data FILE (.txt, .tsv or .jsonl of task text, never the test split)",
            )

        def calibration():  # tokenized once the model and the options passed their checks
            tokenizer = load_tokenizer(model)
            with open_checkpoint(model) as ckpt:
                causal = is_causal_lm(model_config(ckpt) or {})
            return calibration_inputs(tokenizer, config.calib_data, config, causal)

    return pipeline.quantize(
        model,
        out,
        config,
        calibration,
        progress=progress,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )


def _describe(c: QuantizationConfig) -> str:
    if c.bits == 16:
        return c.dtype16
    if not c.quantizes:
        return f"{c.pruning.name} pruning"
    g = f" g{c.group_size}" if c.granularity == "group" else f" per-{c.granularity}"
    a = f"A{c.act_bits} {c.activations}" if c.activations else ""
    sq = f" + SmoothQuant {c.smoothquant}" if c.smoothquant is not None else ""
    return f"W{c.bits}{a}{g} {c.method.upper()}{sq}"


def summary(report: dict, top: int = 8) -> str:
    """A few lines for the terminal: sizes, time and the modules that lost the most."""
    lines = []
    if "conversion" in report:
        c = report["conversion"]
        return f"cast to {report['config']['dtype16']}: wrote {', '.join(c['files'])} in {c['seconds']:.2f} s"
    cfg = QuantizationConfig.from_dict(report["config"])
    before, after = report["bytes_before"], report["bytes_after"]
    lines.append(
        f"{_describe(cfg)}: {report['quantized_linears']} Linear layers quantized, "
        f"{len(report['protected_linears'])} kept in float ({', '.join(report['protected_linears'][:4])})"
    )
    lines.append(
        f"model bytes {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB ({after / before:.1%}) in {report['seconds']:.1f} s"
    )
    if report.get("consumers"):
        lines += [
            "what each consumer does with this folder:",
            *(f"  {c}" for c in report["consumers"]),
        ]
    rows = sorted(report["modules"], key=lambda r: -r.get("weight_rel_err", 0))[:top]
    if rows:
        lines.append("")
        lines.append("| module | weight rel. error | output error (GPTQ) | seconds |")
        lines.append("|---|---|---|---|")
        for r in rows:
            oe = f"{r['output_err']:.3g}" if "output_err" in r else "-"
            lines.append(
                f"| {r['module']} | {r.get('weight_rel_err', 0):.4f} | {oe} | {r['seconds']:.2f} |"
            )
        lines.append(
            f"(worst {len(rows)} of {len(report['modules'])}; all in quantization_report.json)"
        )
    return "\n".join(lines)
