"""Commands that compress: quantize, prune, merge."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from slimport.cli.options import DeprecatedAlias, overwrite_option, stdout_kept_for_json
from slimport.compress.prune import PRUNE_METHODS, QUANT_METHODS, STRUCTURES, UNITS
from slimport.compress.quant.config import GRANULARITIES, METHODS, OBSERVERS, QuantizationConfig
from slimport.errors import SlimportError
from slimport.io.formats import CAST_DTYPES, TARGETS

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _report_first(args) -> None:
    """matplotlib missing or a bad --report path: said before the run, not after it."""
    if args.report:
        from slimport.report.plots import _pyplot

        _pyplot()
        if not Path(args.report).parent.is_dir() or Path(args.report).is_dir():
            raise SlimportError(f"--report {args.report}: give a file in an existing folder")


def _write_report(args, report: dict, command: str) -> None:
    if args.report:
        from slimport.compress.run_report import save_report

        written = save_report(report, args.model, args.out, args.report, command)
        print("report: " + ", ".join(map(str, written[:2])))


# --qat-X flag -> QATSettings field (a recipe's `qat:` section holds the same fields)
QAT_FLAGS = {"qat": "steps", "qat_lr": "lr", "lsq": "lsq", "qat_scale_lr": "scale_lr",
             "qat_loss": "loss", "qat_hidden_weight": "hidden_weight",
             "qat_margin_weight": "margin_weight", "qat_zero_lr": "zero_lr", "qat_float_lr": "float_lr",
             "qat_sort_by_length": "sort_by_length", "qat_batch_size": "batch_size",
             "qat_minutes": "minutes", "qat_boundary": "boundary"}  # fmt: skip


def _qat_settings(args):
    """QAT runs when the recipe has a `qat:` section or --qat is given; flags override it."""
    from slimport.compress.quant.config import read_qat_section
    from slimport.compress.quant.qat import QATSettings

    section = read_qat_section(args.recipe) if args.recipe else None
    flags = {f: getattr(args, a) for a, f in QAT_FLAGS.items() if getattr(args, a) is not None}
    if section is None and args.qat is None:
        extra = sorted(f"--{a.replace('_', '-')}" for a in QAT_FLAGS if a not in ("qat", "lsq")
                       and getattr(args, a) is not None)  # fmt: skip
        if extra:
            raise SlimportError(f"{', '.join(extra)}: QAT options without QAT",
                                hint="add --qat STEPS, or a `qat:` section to the recipe")  # fmt: skip
        return None
    where = f"{args.recipe}: qat option" if section else "QAT option"
    return QATSettings.from_dict({**(section or {}), **flags}, where)


def _quantize(args) -> int:
    from slimport.compress import api

    options = {k: v for k, v in vars(args).items() if k in api.CLI_OPTIONS and v is not None}
    _report_first(args)
    with stdout_kept_for_json(args.json):
        if (settings := _qat_settings(args)) is not None:
            from slimport.compress.quant.qat import quantize_aware

            report = quantize_aware(args.model, args.out, api.make_config(args.recipe, **options),
                                    settings, progress=not args.quiet, overwrite=args.overwrite)  # fmt: skip
        else:
            shard = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
            report = api.quantize(args.model, args.out, recipe=args.recipe, progress=not args.quiet,
                                  overwrite=args.overwrite, **shard, **options)  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(api.summary(report))
    _write_report(args, report, "quantize")
    if q := report.get("qat"):
        print(f"QAT: {q['steps']} steps in {q['seconds']:.0f} s, loss {q['losses'][0]:.4g} -> "
              f"{q['losses'][-1]:.4g}, {q['integers_changed']:.2%} of the integers changed")  # fmt: skip
    return 0


PRUNE_OPTIONS = ("method", "sparsity", "pattern", "ignore", "bits", "quant_method", "group_size",
           "symmetric", "calib_data", "num_samples", "seq_len", "seed", "protect")  # fmt: skip


def _prune(args: argparse.Namespace) -> int:
    if args.structured:
        return _prune_structured(args)
    if args.ratio is not None or args.unit is not None:
        raise SlimportError("--ratio and --unit go with --structured heads|ffn")
    from slimport.compress.prune import api

    options = {k: getattr(args, k) for k in PRUNE_OPTIONS if getattr(args, k) is not None}
    _report_first(args)
    report = api.prune(args.model, args.out, recipe=args.recipe, progress=not args.quiet,
                       overwrite=args.overwrite, **options)  # fmt: skip
    print(api.summary(report))
    _write_report(args, report, "prune")
    return 0


# what structured pruning does not take: it removes whole units, it zeroes nothing
UNSTRUCTURED_ONLY = ("recipe", "sparsity", "pattern", "ignore", "bits", "quant_method",
                     "group_size", "symmetric", "protect")  # fmt: skip


def _prune_structured(args: argparse.Namespace) -> int:
    from slimport.compress.prune import structured

    given = [k for k in UNSTRUCTURED_ONLY if getattr(args, k) is not None]
    if given:
        raise SlimportError(
            f"--structured {args.structured} takes --ratio, not --{given[0].replace('_', '-')}",
            hint="structured pruning removes whole heads/channels; run it and the unstructured "
            "pruning (or --bits) as two commands",
        )
    if args.ratio is None:
        raise SlimportError(f"--structured {args.structured} needs --ratio (e.g. 0.3)")
    method = args.method or ("wanda" if args.calib_data else "magnitude")
    opts = {
        k: getattr(args, k)
        for k in ("num_samples", "seq_len", "seed")
        if getattr(args, k) is not None
    }
    report = structured.prune_structured(
        args.model, args.out, args.structured, args.ratio, method=method,
        unit=args.unit or "head", calib_data=args.calib_data, overwrite=args.overwrite, **opts,
    )  # fmt: skip
    print(structured.summary(report))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from slimport.compress.merge import merge, summary
    from slimport.io.locate import resolve_model

    *models, out = args.paths
    models = [resolve_model(m) for m in models]
    args.base = args.base and resolve_model(args.base)
    opts = {k: getattr(args, k) for k in ("method", "weights", "t", "density", "base", "to",
                                          "dtype", "normalize", "seed", "overwrite")}  # fmt: skip
    print(summary(merge(models, out, **opts)))
    return 0


# QuantizationConfig's own defaults, shown in --help (the options default to None so that a
# --recipe's values are kept unless an option is given)
D = {f.name: f.default for f in fields(QuantizationConfig)}


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser(
        "quantize",
        help="post-training quantization (RTN, GPTQ, AWQ, SmoothQuant) to compressed-tensors",
        description="Quantize MODEL block by block and save it in the compressed-tensors format "
        "(loads in transformers and vLLM). Options override the --recipe YAML; the defaults shown "
        "are the recipe's when neither gives a value.",
        epilog="example: slimport quantize smollm2 out/smollm2-w4 --bits 4 --group-size 64 --method gptq "
        "--calib-data ../shared/data/wikitext-2/valid.txt\n"
        "         slimport quantize minilm out/minilm-w8 --recipe recipe.yaml",
    )
    sp.add_argument("model", metavar="MODEL", help="checkpoint file or folder, a `slimport models` name, or a hub id org/name")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--recipe", help="YAML recipe: QuantizationConfig fields or `modifiers:`; llm-compressor's "
                    "names (scheme: W4A16, ignore, num_calibration_samples, max_seq_length) also read "
                    "(default: none, the options alone)")
    sp.add_argument("--bits", type=int, choices=(16, 8, 4, 3), help=f"weight bits; 16 casts to float16 (default: {D['bits']})")
    sp.add_argument("--method", choices=METHODS, help="rounding algorithm; awq+gptq: AWQ's scales then GPTQ (default: rtn)")
    sp.add_argument("--group-size", type=int, help="per-group weight scales of this many columns; must divide "
                    "every quantized Linear's in_features (default: none, per output channel)")
    sp.add_argument("--granularity", choices=GRANULARITIES,
                    help=f"weight scale granularity (default: {D['granularity']}; group with --group-size)")
    sym = sp.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric weight grid (default: asymmetric below 8 bits, symmetric at 8)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="weight zero points (the default below 8 bits)")
    sp.add_argument("--activations", choices=("static", "dynamic"),
                    help="also quantize Linear inputs to 8 bits (default: weight-only)")
    sp.add_argument("--act-symmetric", action="store_true", default=None,
                    help="symmetric activation grid (default: asymmetric, with a zero point)")
    sp.add_argument("--observer", choices=OBSERVERS,
                    help=f"observer of static activation ranges, as the recipe's `observer` (default: {D['observer']})")
    sp.add_argument("--calib-method", dest="observer", choices=OBSERVERS, action=DeprecatedAlias, new="--observer",
                    help=argparse.SUPPRESS)
    sp.add_argument("--weight-observer", choices=("min_max", "mse"),
                    help=f"weight range: min_max, or mse to search a clipping range (default: {D['weight_observer']})")
    sp.add_argument("--smoothquant", type=float, metavar="ALPHA",
                    help="SmoothQuant migration strength, 0.5 typical (default: off)")
    sp.add_argument("--calib-data", help="calibration text: .txt, .tsv or .jsonl (default: none; GPTQ, AWQ, "
                    "SmoothQuant and static activations need it)")
    sp.add_argument("--num-samples", type=int, help=f"calibration windows (default: {D['num_samples']})")
    sp.add_argument("--seq-len", type=int, help=f"tokens per calibration window (default: {D['seq_len']})")
    sp.add_argument("--seed", type=int, help=f"seed of the calibration windows (default: {D['seed']})")
    sp.add_argument("--protect", action="append", help="regex of Linear names to keep in float "
                    "(repeatable; replaces the default: the output heads lm_head/classifier; '' protects none)")
    sp.add_argument("--gguf-compatible", action="store_true", default=None,
                    help="float16 scales (and Q4_1 minimums): --to gguf writes the integers exactly")
    sp.add_argument("--qat", type=int, metavar="STEPS",
                    help="then quantization-aware training: STEPS of KD from the float model on --calib-data (default: off)")
    sp.add_argument("--qat-lr", type=float, help="QAT learning rate of the weights (default: 1e-5)")
    sp.add_argument("--no-lsq", dest="lsq", action="store_false", default=None, help="QAT: keep the PTQ scales fixed")
    sp.add_argument("--qat-scale-lr", type=float, help="QAT learning rate of the log-scales (default: 1e-3)")
    sp.add_argument("--qat-loss", choices=("kl", "mse"), help="QAT loss on the float model's logits (default: kl; "
                    "mse when the float model is sure of most training inputs, as a fine-tuned classifier)")
    sp.add_argument("--qat-hidden-weight", type=float, help="QAT: weight of a relative MSE on every layer's hidden states (default: 0)")
    sp.add_argument("--qat-margin-weight", type=float, help="QAT: weight of a hinge on the float model's decision (default: 0)")
    sp.add_argument("--qat-zero-lr", type=float, help="QAT: learning rate of static input zero points, in integer units (default: 0, fixed)")
    sp.add_argument("--qat-float-lr", type=float, help="QAT: learning rate of every other float parameter but the embeddings: norms, biases, float Linears (default: 0, fixed)")
    sp.add_argument("--qat-sort-by-length", action="store_true", default=None, help="QAT: batch sentences of like length (less padding)")
    sp.add_argument("--qat-batch-size", type=int, help="QAT: LM windows, or sentences x 32, per step (default: 1)")
    sp.add_argument("--qat-boundary", type=float, help="QAT (classifiers): share of the training sentences drawn from those the float model is least sure of (default: 0, all at random)")
    sp.add_argument("--qat-minutes", type=float, help="QAT: stop after this many minutes (default: 20)")
    sp.add_argument("--max-shard-size", metavar="SIZE", help='largest safetensors shard, bytes or e.g. '
                    '"500MB"; an index when there are several (default: 5GB, as transformers)')
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with per-layer errors and weight histograms (default: none)")  # fmt: skip
    overwrite_option(sp)
    sp.set_defaults(fn=_quantize)

    sp = sub.add_parser(
        "prune",
        help="one-shot pruning (magnitude, Wanda, SparseGPT; unstructured or N:M), optionally + W4/W8",
        description="Prune MODEL block by block (each block calibrated on the pruned previous "
        "ones). Without --bits the output is a float Hugging Face folder; with --bits the kept "
        "weights are quantized (GPTQ keeps the pruned ones at zero) into compressed-tensors.",
        epilog="example: slimport prune smollm2 out/smollm2-24 --method sparsegpt --pattern 2:4 "
        "--calib-data ../shared/data/wikitext-2/valid.txt",
    )
    sp.add_argument("model", metavar="MODEL", help="checkpoint file or folder, a `slimport models` name, or a hub id org/name")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--recipe", help="YAML recipe with a pruning modifier in `modifiers:` (default: none)")
    sp.add_argument("--method", choices=PRUNE_METHODS,
                    help="default: sparsegpt; with --structured the importance: wanda (default with --calib-data) or magnitude")  # fmt: skip
    sp.add_argument("--sparsity", type=float, help="fraction of weights zeroed, in [0, 1) (default: 0.5)")
    sp.add_argument("--pattern", help="unstructured (default) or N:M, N of every M zero: 2:4, 4:8")
    sp.add_argument("--ignore", action="append",
                    help="regex of Linear names left dense (repeatable; still quantized; default: none)")
    sp.add_argument("--bits", type=int, choices=(8, 4, 3), help="then quantize the kept weights (default: float)")
    sp.add_argument("--quant-method", choices=QUANT_METHODS, help="with --bits: default gptq")
    sp.add_argument("--group-size", type=int, help="with --bits: per-group scales (default: per channel)")
    sym = sp.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="with --bits: symmetric grid (default: asymmetric below 8 bits)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="with --bits: zero points")
    sp.add_argument("--calib-data", help="calibration text: .txt, .tsv or .jsonl (Wanda, SparseGPT; default: none)")
    sp.add_argument("--num-samples", type=int, help=f"calibration windows (default: {D['num_samples']})")
    sp.add_argument("--seq-len", type=int, help=f"tokens per calibration window (default: {D['seq_len']})")
    sp.add_argument("--seed", type=int, help=f"seed of the calibration windows (default: {D['seed']})")
    sp.add_argument("--protect", action="append",
                    help="regex of Linear names left untouched (default: the output heads)")  # fmt: skip
    sp.add_argument("--structured", choices=STRUCTURES,
                    help="remove whole attention heads or FFN channels: a smaller model (default: none)")  # fmt: skip
    sp.add_argument("--ratio", type=float, help="with --structured (and needed by it): share of every layer's units removed, in (0, 1) (default: none)")  # fmt: skip
    sp.add_argument("--unit", choices=UNITS,
                    help="--structured heads on GQA models: drop query heads in every KV group alike (head, default) or whole KV groups")  # fmt: skip
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--report", metavar="FILE.html", help="also write an HTML report (+ .md) with per-layer errors and weight histograms (default: none)")  # fmt: skip
    overwrite_option(sp)
    sp.set_defaults(fn=_prune)

    sp = sub.add_parser("merge", help="merge same-architecture models: linear, SLERP, task arithmetic, TIES, DARE",
                        epilog="example: slimport merge sst2-a/ sst2-b/ out/ --method slerp --t 0.5\n"
                        "         slimport merge ft-a/ ft-b/ out/ --method ties --base base/ --density 0.5")
    sp.add_argument("paths", nargs="+", metavar="MODEL", help="two or more checkpoints (any format; one with --base), then OUT")
    sp.add_argument("--method", default="linear", choices=("linear", "slerp", "task_arithmetic", "ties", "dare",
                    "dare_ties", "dare_linear"), help="semantics as mergekit's; dare = dare_linear (the DARE paper)")
    sp.add_argument("--weights", type=float, nargs="+", help="one per model (default 1 each); with --base: the λ of each task vector")
    sp.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second (default 0.5)")
    sp.add_argument("--density", type=float, help="ties/dare: share of each task vector kept, in (0, 1] (default 0.5)")
    sp.add_argument("--base", help="task_arithmetic/ties/dare: the model the others were fine-tuned from (default: none)")
    sp.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                    help="divide by the sum of the weights (default as mergekit: on for linear and ties)")
    sp.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    sp.add_argument("--to", choices=list(TARGETS), default="hf", help="output layout, as convert's (hf: safetensors + config + tokenizer)")
    sp.add_argument("--dtype", choices=CAST_DTYPES, help="cast floating tensors (default: keep the first model's)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    sp.set_defaults(fn=_merge)
    # fmt: on
