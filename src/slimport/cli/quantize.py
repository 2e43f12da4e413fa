"""Commands that compress: quantize, prune, merge."""

from __future__ import annotations

import argparse

from slimport.cli.options import overwrite_option
from slimport.compress.prune import PRUNE_METHODS, QUANT_METHODS
from slimport.compress.quant.config import GRANULARITIES, METHODS, OBSERVERS
from slimport.io.formats import CAST_DTYPES, TARGETS

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _quantize(args) -> int:
    from slimport.compress import api

    if args.qat is not None:
        from slimport.compress.quant.qat import QATSettings, quantize_aware

        options = {k: v for k, v in vars(args).items() if k in api.CLI_OPTIONS and v is not None}
        settings = QATSettings(steps=args.qat, lsq=args.lsq)
        if args.qat_lr is not None:
            settings = QATSettings(steps=args.qat, lsq=args.lsq, lr=args.qat_lr)
        report = quantize_aware(args.model, args.out, api.make_config(args.recipe, **options),
                                settings, progress=not args.quiet, overwrite=args.overwrite)  # fmt: skip
        print(api.summary(report))
        q = report["qat"]
        print(f"QAT: {q['steps']} steps in {q['seconds']:.0f} s, KL {q['losses'][0]:.4g} -> "
              f"{q['losses'][-1]:.4g}, {q['integers_changed']:.2%} of the integers changed")  # fmt: skip
        return 0
    report = api.quantize(
        args.model, args.out, recipe=args.recipe, progress=not args.quiet, overwrite=args.overwrite,
        **{k: v for k, v in vars(args).items() if k in api.CLI_OPTIONS and v is not None},
    )  # fmt: skip
    print(api.summary(report))
    return 0


PRUNE_OPTIONS = ("method", "sparsity", "pattern", "ignore", "bits", "quant_method", "group_size",
           "symmetric", "calib_data", "num_samples", "seq_len", "seed", "protect")  # fmt: skip


def _prune(args: argparse.Namespace) -> int:
    from slimport.compress.prune import api

    options = {k: getattr(args, k) for k in PRUNE_OPTIONS if getattr(args, k) is not None}
    report = api.prune(args.model, args.out, recipe=args.recipe, progress=not args.quiet, **options)
    print(api.summary(report))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from slimport.compress.merge import merge, summary

    *models, out = args.paths
    opts = {k: getattr(args, k) for k in ("method", "weights", "t", "density", "base", "to",
                                          "dtype", "normalize", "seed", "overwrite")}  # fmt: skip
    print(summary(merge(models, out, **opts)))
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "quantize",
        help="post-training quantization (RTN, GPTQ, AWQ, SmoothQuant) to compressed-tensors",
        description="Quantize MODEL block by block and save it in the compressed-tensors format "
        "(loads in transformers and vLLM). Options override the --recipe YAML.",
    )
    sp.add_argument("model", help="checkpoint file or folder (any format `slimport inspect` reads)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--recipe", help="YAML recipe (QuantizationConfig fields, or `modifiers:`)")
    sp.add_argument("--bits", type=int, choices=(16, 8, 4, 3))
    sp.add_argument("--method", choices=METHODS)
    sp.add_argument("--group-size", type=int, help="per-group weight scales of this many columns")
    sp.add_argument("--granularity", choices=GRANULARITIES)
    sym = sp.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric weight grid (default: asymmetric below 8 bits, symmetric at 8)")  # fmt: skip
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="weight zero points (the default below 8 bits)")  # fmt: skip
    sp.add_argument("--activations", choices=("static", "dynamic"), help="also quantize Linear inputs to 8 bits")  # fmt: skip
    sp.add_argument("--act-symmetric", action="store_true", default=None,
                    help="symmetric activation grid (default: asymmetric, with a zero point)")  # fmt: skip
    sp.add_argument("--calib-method", dest="observer", choices=OBSERVERS,
                    help="observer for static activation ranges")  # fmt: skip
    sp.add_argument("--weight-observer", choices=("min_max", "mse"))
    sp.add_argument("--smoothquant", type=float, metavar="ALPHA", help="SmoothQuant migration strength (0.5 typical)")  # fmt: skip
    sp.add_argument("--calib-data", help="calibration text: .txt, .tsv or .jsonl")
    sp.add_argument("--num-samples", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument(
        "--protect",
        action="append",
        help="regex of Linear names to keep in float "
        "(repeatable; replaces the default lm_head/classifier)",
    )
    sp.add_argument("--gguf-compatible", action="store_true", default=None,
                    help="float16 scales (and Q4_1 minimums): --to gguf writes the integers exactly")  # fmt: skip
    sp.add_argument("--qat", type=int, metavar="STEPS",
                    help="then quantization-aware training: STEPS of KD from the float model on --calib-data")  # fmt: skip
    sp.add_argument("--qat-lr", type=float, help="QAT learning rate of the weights (1e-5)")
    sp.add_argument(
        "--no-lsq", dest="lsq", action="store_false", help="QAT: keep the PTQ scales fixed"
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    overwrite_option(sp)
    sp.set_defaults(fn=_quantize)

    sp = sub.add_parser(
        "prune",
        help="one-shot pruning (magnitude, Wanda, SparseGPT; unstructured or N:M), optionally + W4/W8",
        description="Prune MODEL block by block (each block calibrated on the pruned previous "
        "ones). Without --bits the output is a float Hugging Face folder; with --bits the kept "
        "weights are quantized (GPTQ keeps the pruned ones at zero) into compressed-tensors.",
    )
    sp.add_argument("model", help="checkpoint file or folder (any format `slimport inspect` reads)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--recipe", help="YAML recipe with a pruning modifier in `modifiers:`")
    sp.add_argument("--method", choices=PRUNE_METHODS, help="default sparsegpt")
    sp.add_argument("--sparsity", type=float, help="fraction of weights zeroed, in [0, 1) (0.5)")
    sp.add_argument("--pattern", help="unstructured (default) or N:M, N of every M zero: 2:4, 4:8")
    sp.add_argument("--ignore", action="append",
                    help="regex of Linear names left dense (repeatable; still quantized)")  # fmt: skip
    sp.add_argument("--bits", type=int, choices=(8, 4, 3), help="then quantize the kept weights")
    sp.add_argument("--quant-method", choices=QUANT_METHODS, help="with --bits: default gptq")
    sp.add_argument("--group-size", type=int, help="with --bits: per-group scales")
    sym = sp.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    sp.add_argument(
        "--calib-data", help="calibration text: .txt, .tsv or .jsonl (Wanda, SparseGPT)"
    )
    sp.add_argument("--num-samples", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--protect", action="append",
                    help="regex of Linear names left untouched (default: the output heads)")  # fmt: skip
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_prune)

    # fmt: off
    sp = sub.add_parser("merge", help="merge same-architecture models: linear, SLERP, task arithmetic, TIES, DARE",
                        epilog="example: slimport merge sst2-a/ sst2-b/ out/ --method slerp --t 0.5; "
                        "slimport merge ft-a/ ft-b/ out/ --method ties --base base/ --density 0.5")
    sp.add_argument("paths", nargs="+", metavar="MODEL", help="two or more checkpoints (any format; one with --base), then OUT")
    sp.add_argument("--method", default="linear", choices=("linear", "slerp", "task_arithmetic", "ties", "dare",
                    "dare_ties", "dare_linear"), help="default linear; semantics as mergekit's; dare = dare_linear (the DARE paper)")
    sp.add_argument("--weights", type=float, nargs="+", help="one per model (default 1 each); with --base: the λ of each task vector")
    sp.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second (default 0.5)")
    sp.add_argument("--density", type=float, help="ties/dare: share of each task vector kept, in (0, 1] (default 0.5)")
    sp.add_argument("--base", help="task_arithmetic/ties/dare: the model the others were fine-tuned from")
    sp.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                    help="divide by the sum of the weights (default as mergekit: on for linear and ties)")
    sp.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop (default 0)")
    sp.add_argument("--to", choices=list(TARGETS), default="hf", help="output layout, as convert's (default hf: safetensors + config + tokenizer)")
    sp.add_argument("--dtype", choices=CAST_DTYPES, help="cast floating tensors (default: keep the first model's)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    sp.set_defaults(fn=_merge)
    # fmt: on
