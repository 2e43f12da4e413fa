"""Accuracy of a sequence classifier on a labelled sentence set (SST-2 dev)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from slimport.data import read_labeled
from slimport.errors import SlimportError
from slimport.evaluate.perplexity import _device, _logits


@torch.no_grad()
def predict(
    model, tokenizer, texts: list[str], batch_size: int = 64, progress: bool = False
) -> list[int]:
    """Argmax class of each text, in input order.

    Texts are sorted by token length and padded per batch (dynamic padding): SST-2 sentences
    run from 2 to 60 tokens, so padding every batch to the longest costs ~3x.
    """
    if hasattr(model, "eval"):
        model.eval()
    device = _device(model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, verbose=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    predictions = [0] * len(texts)
    for start in tqdm(
        range(0, len(order), batch_size), desc="classify", disable=not progress, leave=False
    ):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt"
        ).to(device)
        for i, p in zip(idx, _logits(model(**enc)).argmax(-1).tolist(), strict=True):
            predictions[i] = p
    return predictions


def sst2_accuracy(
    model,
    tokenizer,
    path: str | Path,
    batch_size: int = 64,
    reference: list[int] | dict | None = None,
    progress: bool = False,
) -> dict:
    """Accuracy of `model` on a `text<TAB>label` file; with `reference` (another run's
    predictions, or its result dict), also the share of identical predictions (agreement).
    """
    texts, labels = read_labeled(path)
    t0 = time.perf_counter()
    predictions = predict(model, tokenizer, texts, batch_size, progress)
    result = {
        "accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels),
        "n": len(labels),
        "predictions": predictions,
        "seconds": time.perf_counter() - t0,
    }
    if reference is not None:
        if isinstance(reference, dict):
            reference = reference["predictions"]
        if len(reference) != len(predictions):
            raise SlimportError(
                f"{path}: reference has {len(reference)} predictions, the set has {len(labels)}"
            )
        result["agreement"] = sum(
            a == b for a, b in zip(predictions, reference, strict=True)
        ) / len(labels)
    return result
