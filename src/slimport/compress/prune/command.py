"""The `slimport prune` subcommand: its arguments and the thin function that runs it."""

from __future__ import annotations

import argparse

from slimport.compress.prune import PRUNE_METHODS, QUANT_METHODS


def add_parser(sub) -> None:
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
    sp.set_defaults(fn=run)


OPTIONS = ("method", "sparsity", "pattern", "ignore", "bits", "quant_method", "group_size",
           "symmetric", "calib_data", "num_samples", "seq_len", "seed", "protect")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from slimport.compress.prune import api

    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    report = api.prune(args.model, args.out, recipe=args.recipe, progress=not args.quiet, **options)
    print(api.summary(report))
    return 0
