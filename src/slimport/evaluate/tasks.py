"""One number per task for training loops to report: SST-2 dev accuracy, held-out perplexity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimport.errors import SlimportError


def task_metric(
    task: str, dev: str | Path, seq_len: int = 256, windows: int | None = 8
) -> Callable:
    """`metric(model, tokenizer) -> {"accuracy": ..}` on a labelled set (sst2), or
    `{"perplexity": ..}` on the first `windows` non-overlapping `seq_len`-token windows of a
    text (lm, the WikiText-2 protocol; the text is tokenized once, on the first call)."""
    if task == "sst2":
        from slimport.evaluate.classification import sst2_accuracy

        def accuracy(model, tokenizer) -> dict:
            return {"accuracy": sst2_accuracy(model, tokenizer, dev)["accuracy"]}

        return accuracy
    if task == "lm":
        from slimport.data import wikitext_windows
        from slimport.evaluate.perplexity import perplexity

        ids = []

        def ppl(model, tokenizer) -> dict:
            if not ids:
                ids.append(wikitext_windows(tokenizer, dev, seq_len, windows))
            return {"perplexity": perplexity(model, ids[0], progress=False)["perplexity"]}

        return ppl
    raise SlimportError(f"unknown task {task!r}; choose sst2 or lm")
