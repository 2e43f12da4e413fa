"""Perplexity of a causal LM over fixed token windows (the WikiText-2 protocol).

perplexity = exp(mean over windows of the window's mean next-token NLL), each window scored on
its own with no context carried over (GPTQ / AWQ / SmoothQuant papers). Windows have equal
length, so this equals exp of the mean NLL over all predicted tokens.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from slimport.errors import SlimportError


def _logits(output) -> torch.Tensor:
    """Logits from a transformers output object, a tuple, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise SlimportError(f"the model returned {type(output).__name__}, not logits")
    return logits


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def window_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token NLL per row: logits [b, t, vocab], ids [b, t] -> [b] (float64).

    log-softmax in float32 at least (a bf16/fp16 model's logits are upcast first), the mean in
    float64 so windows of any length add up without rounding drift. `keep` [b, t - 1] bool: the
    targets scored (default all).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = -logp.gather(-1, input_ids[:, 1:, None].to(logp.device)).squeeze(-1).double()
    if keep is None:
        return picked.mean(dim=-1)
    keep = keep.to(picked.device)
    return (picked * keep).sum(dim=-1) / keep.sum(dim=-1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = True, batch_size: int = 1) -> dict:
    """Score `windows` [n, seq_len] with `model` (a causal LM called as `model(input_ids)`).

    Returns perplexity, mean_nll, nll (one per window), windows, seq_len, tokens (predicted
    tokens scored: n * (seq_len - 1)) and seconds.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise SlimportError(
            f"perplexity needs token windows [n >= 1, seq_len >= 2], got {tuple(windows.shape)}"
        )
    if hasattr(model, "eval"):
        model.eval()
    device = _device(model)
    n, seq_len = windows.shape
    nll: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size].to(device)
        nll += window_nll(_logits(model(batch)), batch).tolist()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(sum(nll) / len(nll)):.3f}")
    bar.close()
    mean = sum(nll) / n
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "nll": nll,
        "windows": n,
        "seq_len": seq_len,
        "tokens": n * (seq_len - 1),
        "seconds": time.perf_counter() - t0,
    }
