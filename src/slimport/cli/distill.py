"""`slimport distill`: train a smaller student to match a teacher (SST-2 classifier or causal LM)."""

from __future__ import annotations

import dataclasses

from slimport.compress.distill import HIDDEN_LOSSES, TASKS, DistillSettings

D = {f.name: f.default for f in dataclasses.fields(DistillSettings)}  # shown in --help

# Each command imports what it runs inside its function (torch, transformers take seconds).

SETTINGS = ("alpha", "temperature", "hidden_loss", "hidden_weight", "hidden_projection",
            "attention_weight", "max_steps", "lr", "batch_size", "seq_len", "top_k", "seed",
            "minutes", "threads", "eval_every", "keep_sparsity")  # fmt: skip


def _distill(args) -> int:
    from slimport.compress.distill import DistillSettings, distill
    from slimport.data import shared_dir

    settings = dataclasses.replace(
        DistillSettings(),
        **{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None},
    )
    shared = shared_dir() / "data"
    default_train = {"sst2": "sst2/train.tsv", "lm": "wikitext-2/valid.txt"}[args.task]
    default_dev = {"sst2": "sst2/dev.tsv", "lm": "wikitext-2-raw/wiki.test.raw"}[args.task]
    train = args.train or shared / default_train
    dev = args.dev or shared / default_dev
    metric = None
    if not args.no_eval:
        from slimport.evaluate.tasks import task_metric

        metric = task_metric(args.task, dev, settings.seq_len, args.windows)
    report = distill(
        args.teacher, args.out, args.student, args.task, train, settings, metric,
        progress=not args.quiet,
    )  # fmt: skip
    shown = {k: report[k] for k in ("accuracy", "perplexity") if k in report}
    what = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
    print(
        f"{report['student']}: {report['parameters']['student'] / 1e6:.1f}M parameters "
        f"(teacher {report['parameters']['teacher'] / 1e6:.1f}M), {report['steps']} steps in "
        f"{report['train_seconds'] / 60:.1f} min{'; ' + what if what else ''}"
    )
    print(f"model: {args.out}")
    return 0


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser(
        "distill", help="knowledge distillation: a smaller student trained on a teacher's logits",
        description="Train STUDENT (layers of TEACHER, a smaller config.json, or a checkpoint) on "
        "alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE, optionally with hidden-state and "
        "attention-map losses. Teacher logits are cached on disk: the teacher runs once.",
        epilog="example: slimport distill .cache/models/minilm-sst2-8e872c668e out/ "
        "--student layers:0,2,4 --task sst2",
    )
    sp.add_argument("teacher", help="teacher checkpoint (any format slimport reads)")
    sp.add_argument("out", help="output folder (HF layout + distill_report.json)")
    sp.add_argument("--student", help="layers:0,2,4 | every:2 (default, DistilBERT) | depth:N | "
                    "a config.json (random init) | a checkpoint")
    sp.add_argument("--task", choices=TASKS, default="sst2")
    sp.add_argument("--train", help="training data (default: SST-2 train, or WikiText-2 valid for lm; never a test split)")
    sp.add_argument("--dev", help="evaluation data (default: SST-2 dev, or WikiText-2 raw test windows for lm)")
    sp.add_argument("--windows", type=int, default=8, help="lm: evaluation windows of --seq-len tokens")
    sp.add_argument("--no-eval", action="store_true", help="skip the evaluation metric")
    sp.add_argument("--alpha", type=float, help="weight of the soft (teacher) loss (default 0.8; 0 = labels only)")
    sp.add_argument("--temperature", type=float, help="softmax temperature T (default 2)")
    sp.add_argument("--hidden-loss", choices=HIDDEN_LOSSES, help="also match mapped hidden states (default: logits only)")
    sp.add_argument("--hidden-weight", type=float, help=f"weight of the hidden-state loss (default: {D['hidden_weight']})")
    sp.add_argument("--hidden-projection", action="store_true", default=None,
                    help="learn a Linear when the student's hidden size differs from the teacher's")
    sp.add_argument("--attention-weight", type=float, help=f"> 0: MiniLM attention-map transfer on the last layer (default: {D['attention_weight']})")
    sp.add_argument("--keep-sparsity", action="store_true", default=None,
                    help="the student is pruned (slimport prune): its zero weights stay zero, so "
                    "distillation recovers accuracy at the same sparsity")
    sp.add_argument("--max-steps", type=int, help=f"(default: {D['max_steps']})")
    sp.add_argument("--lr", type=float, help=f"AdamW learning rate (default: {D['lr']})")
    sp.add_argument("--batch-size", type=int, help=f"(default: {D['batch_size']})")
    sp.add_argument("--seq-len", type=int, help="lm: tokens per window (default 256)")
    sp.add_argument("--top-k", type=int, help="lm: teacher logits cached per position (default 64)")
    sp.add_argument("--seed", type=int, help=f"(default: {D['seed']})")
    sp.add_argument("--minutes", type=float, help=f"wall-clock budget; training stops cleanly, then evaluates (default: {D['minutes']})")
    sp.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    sp.add_argument("--eval-every", type=int, help="evaluate every N steps, shown on the progress bar (default: 0, at the end)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_distill)
    # fmt: on
