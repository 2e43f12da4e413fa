"""`slimport sensitivity`: what quantizing each Linear alone costs, and `--budget` recipes."""

from __future__ import annotations

import argparse
import json

METHODS = ("rtn", "gptq", "awq", "awq+gptq")  # analyze.sensitivity.SENSITIVITY_METHODS


def _group_sizes(text: str) -> list[int]:
    try:
        sizes = [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers (64,128)") from None
    if any(g <= 0 for g in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: group sizes must be positive")
    return sizes


def _sensitivity(args: argparse.Namespace) -> int:
    from slimport.analyze.sensitivity import Setup
    from slimport.analyze.sensitivity_command import run, summary

    setup = Setup(
        model=args.model, calib_data=args.calib_data, eval_data=args.eval_data,
        method=args.method, bits=args.bits, group_size=args.group_size or None,
        protect=tuple(args.protect) if args.protect else None, windows=args.windows,
        seq_len=args.seq_len, examples=args.examples, num_samples=args.num_samples, seed=args.seed,
        unit=args.unit, check_windows=args.check_windows, skip_unk=not args.score_unk,
    )  # fmt: skip
    if args.report:
        from slimport.report.plots import _pyplot

        _pyplot()  # matplotlib missing: said before the run, not after it

    def progress(i, n, row):
        if not args.quiet:
            print(f"\r[{i}/{n}] {row['module']} {row['scheme']}", end="", flush=True)
            if i == n:
                print()

    result = run(setup, args.budget, args.recipe_out, args.group_sizes, args.ray,
                 args.workers, progress, confidence=args.confidence)  # fmt: skip
    probe = result.pop("_probe")
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.report:
        from slimport.analyze.sensitivity_report import save_report

        written = save_report(result, probe, args.report)
        print("report: " + ", ".join(map(str, written[:2])))
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "sensitivity",
        help="cost of quantizing each Linear alone (ranked); --budget: a mixed-precision recipe",
        description="Quantize each Linear of MODEL (a float Hugging Face folder) alone and score "
        "the model on a held-out slice: perplexity (causal LM) or accuracy (classifier). With "
        "--budget, search per-module schemes (float, W8, W4 groups) for the smallest model that "
        "meets it and write the recipe `slimport quantize --recipe` takes.",
        epilog="example: slimport sensitivity out/smollm2 --calib-data valid.txt --eval-data "
        'valid.txt --budget "ppl<=+5%%" --recipe-out mixed.yaml --report sens.html',
    )
    sp.add_argument("model", help="float Hugging Face folder (slimport convert --to hf)")
    sp.add_argument(
        "--calib-data",
        help="calibration text (.txt/.tsv/.jsonl; GPTQ/AWQ, and the recipe; default: none)",
    )
    sp.add_argument("--eval-data", required=True,
                    help="held-out slice: text (its last --windows windows) or labelled .tsv")  # fmt: skip
    sp.add_argument("--bits", type=int, default=4, choices=(8, 4, 3))
    sp.add_argument("--group-size", type=int, default=64, help="0: per channel")
    sp.add_argument("--method", default="rtn", choices=METHODS)
    sp.add_argument(
        "--protect",
        action="append",
        help="regex of Linears kept float (repeatable; default: the output heads)",
    )
    sp.add_argument("--unit", default="linear", choices=("linear", "block"),
                    help="quantized alone: each Linear (default), or each block's Linears")  # fmt: skip
    sp.add_argument("--windows", type=int, default=4, help="causal LM: held-out windows")
    sp.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    sp.add_argument("--examples", type=int, default=256, help="classifier: held-out rows")
    sp.add_argument("--num-samples", type=int, default=16, help="calibration samples")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--budget",
        help='"ppl<=+5%%", "accuracy>=-0.5pt" or "bits<=4.5" (default: none, the ranking only)',
    )
    sp.add_argument("--confidence", type=float,
                    help="ppl budgets: met on this one-sided upper confidence bound of the "
                    "increase over the windows (Student t on paired per-window NLLs), not the "
                    "slice's mean (default 0.9; 0: the mean)")  # fmt: skip
    sp.add_argument("--check-windows", type=int, default=0,
                    help="causal LM --budget: score the candidate recipes on these windows (the "
                    "ones before --windows'), which the one-module costs never saw (default 0: "
                    "the same windows)")  # fmt: skip
    sp.add_argument("--score-unk", action="store_true",
                    help="causal LM: score the tokens of WikiText v1's <unk> placeholders too "
                    "(default: not; raw text has the words there)")  # fmt: skip
    sp.add_argument("--recipe-out", help="where --budget writes its recipe (YAML; default: none)")
    sp.add_argument("--group-sizes", type=_group_sizes,
                    help="--budget: W{bits} group sizes to try (default: --group-size)")  # fmt: skip
    sp.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="run the one-module evaluations on Ray: a local cluster of --workers "
                    "CPUs, or the cluster at ADDRESS (default: serial, no Ray)")  # fmt: skip
    sp.add_argument("--workers", type=int, default=2, help="--ray local: workers")
    sp.add_argument("--json", help="write the result as JSON to this file (default: none)")
    sp.add_argument(
        "--report", metavar="FILE.html", help="HTML report (+ .md) with plots (default: none)"
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_sensitivity)
