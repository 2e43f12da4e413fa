"""Distilling the MiniLM-L6 SST-2 classifier into a 3-layer student (DistilBERT's every-other-layer
init): SST-2 dev accuracy and sentences/s of the teacher, the distilled student, and the same
student trained on the labels alone (same init, steps, lr, seed: the gain distillation buys).

    python benchmarks/distill_sst2.py                       # teacher: finetune's `full` recipe
    python benchmarks/distill_sst2.py --steps 400 --student layers:0,2,4 --minutes 10

Throughput: `sst2_accuracy` (batches of 64, length-sorted, one thread) on the 872 dev sentences,
best of `--repeats` runs per model, models interleaved. Timings on the shared 2-core machine are
noisy; the ratio of teacher and student measured side by side is the number to read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.compress.distill import DistillSettings, distill  # noqa: E402
from slimport.evaluate.classification import sst2_accuracy  # noqa: E402
from slimport.evaluate.tasks import task_metric  # noqa: E402
from slimport.finetune import ensure_sst2_classifier, sst2_path  # noqa: E402


def load(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    return net.eval(), AutoTokenizer.from_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="full", help="the teacher's finetune recipe (full: 88.4%%)")
    ap.add_argument("--student", default="every:2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hidden-loss", choices=("mse", "cosine"), help="distilled: + hidden-state loss on mapped layers")  # fmt: skip
    ap.add_argument("--attention-weight", type=float, default=0.0, help="distilled: + MiniLM attention-map KL")  # fmt: skip
    ap.add_argument("--minutes", type=float, default=20.0, help="budget of each training run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("distilled", "plain"), help="train one student only")
    ap.add_argument("--scratch", default=".cache/bench-distill")
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = ensure_sst2_classifier(recipe=args.recipe)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    dev = sst2_path("dev")
    base = DistillSettings(max_steps=args.steps, lr=args.lr, temperature=args.temperature,
                           minutes=args.minutes)  # fmt: skip
    runs = {"distilled": args.alpha, "plain": 0.0}
    if args.only:
        runs = {args.only: runs[args.only]}
    reports = {}
    for name, alpha in runs.items():
        out = scratch / name
        shutil.rmtree(out, ignore_errors=True)
        extra = {"hidden_loss": args.hidden_loss, "attention_weight": args.attention_weight}
        # the baseline sees the labels only: no teacher signal of any kind
        settings = DistillSettings(**{**base.__dict__, "alpha": alpha, **(extra if alpha else {})})
        reports[name] = distill(teacher, out, args.student, "sst2", sst2_path("train"), settings,
                                task_metric("sst2", dev))  # fmt: skip
    models = {"teacher": teacher, **{n: scratch / n for n in reports}}
    loaded = {n: load(f) for n, f in models.items()}
    ref = sst2_accuracy(*loaded["teacher"], dev)
    best = {n: float("inf") for n in models}
    results = {}
    for _ in range(args.repeats):
        for n, (net, tok) in loaded.items():
            r = sst2_accuracy(net, tok, dev, reference=ref)
            best[n] = min(best[n], r["seconds"])
            results[n] = r
    print(
        header(
            "python benchmarks/distill_sst2.py " + " ".join(sys.argv[1:]), ("torch", "transformers")
        )
    )
    print()
    print(f"teacher {teacher.name}; student {args.student}; {args.steps} steps of 32 sentences, "
          f"lr {args.lr}, alpha {args.alpha}, T {args.temperature}, hidden loss {args.hidden_loss}, "
          f"attention weight {args.attention_weight}; frozen word embeddings; 1 thread")  # fmt: skip
    print()
    print(
        "| model | layers | parameters | SST-2 dev accuracy | agreement with teacher | sentences/s | speed-up | train min |"
    )
    print("|---|---|---|---|---|---|---|---|")
    n_dev = results["teacher"]["n"]
    for n, (net, _) in loaded.items():
        rep = reports.get(n, {})
        label = {"teacher": "teacher (fine-tuned MiniLM-L6)", "distilled": f"student, distilled (alpha {args.alpha})",
                 "plain": "student, labels only (alpha 0)"}[n]  # fmt: skip
        train_min = f"{rep['train_seconds'] / 60:.1f}" if rep else "-"
        if rep.get("stopped_early"):
            train_min += f" (budget: {rep['steps']}/{rep['planned_steps']} steps)"
        print(f"| {label} | {net.config.num_hidden_layers} | {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M "
              f"| {results[n]['accuracy']:.2%} | {results[n]['agreement']:.2%} | {n_dev / best[n]:.0f} "
              f"| {best['teacher'] / best[n]:.2f}x | {train_min} |")  # fmt: skip


if __name__ == "__main__":
    main()
