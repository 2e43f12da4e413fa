"""The `slimport merge` subcommand: its arguments and the thin function that runs it."""

from __future__ import annotations

import argparse

from slimport.io.formats import CAST_DTYPES, TARGETS


def add_parser(sub) -> None:
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
    sp.set_defaults(fn=run)
    # fmt: on


def run(args: argparse.Namespace) -> int:
    from slimport.compress.merge import merge, summary

    *models, out = args.paths
    opts = {k: getattr(args, k) for k in ("method", "weights", "t", "density", "base", "to",
                                          "dtype", "normalize", "seed", "overwrite")}  # fmt: skip
    print(summary(merge(models, out, **opts)))
    return 0
