"""Fold a per-channel scale between two layers without changing what the model computes:
the producer's output is divided by s, the consumers' weight columns multiplied by s.
Used by SmoothQuant and AWQ."""

from __future__ import annotations

import torch
from torch import nn


def _param(m: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(m, name, None)
    return p if isinstance(p, torch.Tensor) else None


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """In place: the input of `linears` becomes x / s and their weight columns * s.

    prev is a norm with an elementwise `weight` (and optional `bias`) over the last dim --
    LayerNorm, LlamaRMSNorm, ... -- or an nn.Linear whose output rows (and bias) are divided by
    s. Everything is checked before anything is modified; ValueError if shapes do not line up."""
    s = s.detach().reshape(-1)
    n = s.numel()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("fold_scales: scales must be finite and positive")
    if not linears:
        raise ValueError("fold_scales: no Linear to fold the scales into")
    for lin in linears:
        if not isinstance(lin, nn.Linear) or lin.in_features != n:
            raise ValueError(f"fold_scales: {lin} does not take {n} input features")

    w = _param(prev, "weight")
    b = _param(prev, "bias")
    if isinstance(prev, nn.Linear):
        if prev.out_features != n:
            raise ValueError(f"fold_scales: {prev} does not produce {n} features")
        row = s.reshape(-1, 1)
    else:
        if w is None or w.shape != (n,):
            raise ValueError(
                f"fold_scales: cannot fold {n} scales into {type(prev).__name__} "
                "(needs an elementwise weight over the last dim, or a Linear)"
            )
        if "gemma" in type(prev).__name__.lower():
            # Gemma norms compute x * (1 + weight): dividing `weight` by s would not divide the output
            raise ValueError(
                f"fold_scales: {type(prev).__name__} scales by (1 + weight); not foldable"
            )
        row = s
    if b is not None and b.shape != (n,):
        raise ValueError(
            f"fold_scales: bias {tuple(b.shape)} of {type(prev).__name__} is not [{n}]"
        )

    def div(p: torch.Tensor, by: torch.Tensor) -> None:
        p.copy_((p.float() / by.float()).to(p.dtype))

    div(w, row)
    if b is not None:
        div(b, s)
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s.float()).to(lin.weight.dtype))
