"""Model merging on real fine-tunes: two SST-2 classifiers trained from all-MiniLM-L6-v2 with
different seeds (`slimport.finetune`, cached), merged by `slimport merge`; SST-2 dev accuracy
of each input and of every merge.

Task arithmetic needs the model the fine-tune started from. MiniLM has no classification head,
so the base is MiniLM with the head the first seed's fine-tune was initialised with (the same
`torch.manual_seed(seed)` then `from_pretrained` as finetune.py): base + λ·(finetuned − base)
is then exactly the initialisation at λ = 0 and the fine-tune at λ = 1. The second seed's head
started elsewhere, so merges of both seeds (linear, SLERP, TIES, DARE) average heads that were
initialised differently; the encoders share MiniLM.

    python benchmarks/merge_sst2.py                          # recipe ci, seeds 0 and 1
    python benchmarks/merge_sst2.py --recipe full --lambdas 0.5 1 1.5
    python benchmarks/merge_sst2.py --part pair              # only the merges of both seeds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.compress.merge import merge  # noqa: E402
from slimport.evaluate.classification import sst2_accuracy  # noqa: E402
from slimport.finetune import LABELS, default_model, ensure_sst2_classifier, sst2_path  # noqa: E402


def initial_classifier(seed: int, out: Path) -> Path:
    """MiniLM with the classification head finetune(seed=seed) started from."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = default_model()
    torch.manual_seed(seed)
    net = BertForSequenceClassification.from_pretrained(
        model, num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    net.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def evaluate(folder: Path, reference: dict | None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    return sst2_accuracy(
        net, AutoTokenizer.from_pretrained(folder), sst2_path("dev"), reference=reference
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="ci", choices=("ci", "full"))
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 1))
    ap.add_argument("--t", type=float, nargs="+", default=(0.5,), help="SLERP t values")
    ap.add_argument("--lambdas", type=float, nargs="+", default=(0.5, 1.0, 1.5))
    ap.add_argument("--density", type=float, default=0.5, help="TIES / DARE density")
    ap.add_argument("--part", choices=("all", "single", "pair", "dare"), default="all",
                    help="single: base and task arithmetic of the first seed; pair: merges of both; dare: only the DARE merges")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine (see finetune.py)

    s0, s1 = args.seeds
    # the cache key ignores the wall-clock budget: a generous one never cuts a busy run short
    a = ensure_sst2_classifier(recipe=args.recipe, seed=s0, minutes=60.0)
    print(header(" ".join(["python", *sys.argv]), ("torch", "transformers")))
    print(f"recipe {args.recipe}; SST-2 dev; agreement = identical predictions to seed {s0}\n")
    print("| model | dev accuracy | agreement | merge + write s |")
    print("|---|---:|---:|---:|", flush=True)
    ref = None

    def row(label: str, folder: Path, seconds: float | None = None) -> None:
        nonlocal ref
        r = evaluate(folder, ref)
        ref = ref or r
        agree = f"{r['agreement']:.2%}" if "agreement" in r else "—"
        took = "—" if seconds is None else f"{seconds:.1f}"
        print(f"| {label} | {r['accuracy']:.2%} | {agree} | {took} |", flush=True)

    with tempfile.TemporaryDirectory(prefix="merge-sst2-") as tmp:
        work = Path(tmp)

        def merged(label: str, models, **kw) -> None:
            out = work / f"m{len(list(work.iterdir()))}"
            t0 = time.perf_counter()
            merge(models, out, progress=False, **kw)
            row(label, out, time.perf_counter() - t0)

        # the first seed's rows first: the second fine-tune may still be training (cache lock)
        row(f"fine-tune, seed {s0} ({a.name})", a)
        base = initial_classifier(s0, work / "base")
        if args.part in ("all", "single"):
            row(f"base: MiniLM + seed {s0}'s initial head", base)
        for lam in args.lambdas if args.part in ("all", "single") else ():
            merged(f"task arithmetic, base + {lam:g}·(seed {s0} − base)", [a],
                   method="task_arithmetic", base=base, weights=[lam])  # fmt: skip
        if args.part == "single":
            return
        b = ensure_sst2_classifier(recipe=args.recipe, seed=s1, minutes=60.0)
        row(f"fine-tune, seed {s1} ({b.name})", b)
        d = args.density
        if args.part != "dare":
            merged("linear, weights 0.5 / 0.5", [a, b], method="linear")
            for t in args.t:
                merged(f"SLERP, t = {t:g}", [a, b], method="slerp", t=t)
            merged(f"task arithmetic, base + τ{s0} + τ{s1}", [a, b], method="task_arithmetic",
                   base=base)  # fmt: skip
            merged(f"TIES, density {d:g}", [a, b], method="ties", base=base, density=d)
        merged(f"DARE-TIES, density {d:g}", [a, b], method="dare_ties", base=base, density=d)
        merged(f"DARE (linear), density {d:g}, weights 0.5 / 0.5", [a, b], method="dare",
               base=base, density=d, weights=[0.5, 0.5])  # fmt: skip


if __name__ == "__main__":
    main()
