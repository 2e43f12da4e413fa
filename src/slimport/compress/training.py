"""What every training loop here shares: length-grouped batches, the warmup-then-linear-decay
learning rate, a scoped torch thread count and the cache folder (fine-tuning, distillation, QAT)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from slimport.data import project_root


def cache_root() -> Path:
    """`$SLIMPORT_CACHE`, else `<project root>/.cache`."""
    return Path(os.environ.get("SLIMPORT_CACHE") or project_root() / ".cache")


def length_grouped_batches(lengths: list[int], batch_size: int, steps: int, gen: torch.Generator):
    """Yield `steps` index batches, epoch after epoch, each of similar lengths.

    HF's LengthGroupedSampler: shuffle, sort within mega-batches of 50 batches, shuffle the
    batches. The longest batch goes first so memory peaks at once, not mid-run.
    """
    done, n, mega = 0, len(lengths), 50 * batch_size
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        batches = []
        for start in range(0, n, mega):
            group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        perm = torch.randperm(len(batches), generator=gen).tolist()
        first = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        perm.remove(first)
        for b in [first, *perm]:
            if done == steps:
                return
            yield batches[b]
            done += 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, no weight decay on biases and norms (ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, fused=True,  # one fused kernel: 4x faster than the default on CPU
    )  # fmt: skip


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
