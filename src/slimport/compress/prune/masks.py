"""Which weights to prune, given a score per weight (low = pruned). Every mask is bool, True
where the weight becomes zero, and has exactly the count asked for (ties broken by position)."""

from __future__ import annotations

import torch


def count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity prunes."""
    return int(round(numel * sparsity))


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest entries of each row of a 2-D score; of equal scores at the threshold the
    first ones. (A selection, not a sort: twice as fast as topk on a block's 10^5 scores.)"""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.shape[1] <= 16:  # N:M groups: topk of a few is cheaper than a selection
        mask = torch.zeros_like(scores, dtype=torch.bool)
        return mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    mask = scores < threshold
    ties = scores == threshold
    return mask | (ties & (ties.cumsum(1) <= k - mask.sum(1, keepdim=True)))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest fraction of the whole matrix (magnitude pruning's comparison group)."""
    flat = lowest(scores.reshape(1, -1), count(scores.numel(), sparsity))
    return flat.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest fraction of each output row (Wanda's comparison group)."""
    return lowest(scores, count(scores.shape[1], sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: the n lowest of every m consecutive inputs of each row (m divides the columns)."""
    rows, cols = scores.shape
    return lowest(scores.reshape(-1, m), n).reshape(rows, cols)


def select(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool):
    """The mask for a pattern: N:M groups, else per row or per layer."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity) if per_row else layer_mask(scores, sparsity)
