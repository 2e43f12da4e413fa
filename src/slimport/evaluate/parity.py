"""Numbers that say how close two tensors, checkpoints or models are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimport.convert.loader import load
from slimport.errors import SlimportError, name_list


@dataclass
class Delta:
    max_abs: float
    max_rel: float
    l2: float
    cosine: float

    def __str__(self) -> str:
        return f"max|Δ| {self.max_abs:.2e}  rel {self.max_rel:.2e}  L2 {self.l2:.2e}  cos {self.cosine:.8f}"


def delta(a: torch.Tensor, b: torch.Tensor) -> Delta:
    """Compare two tensors of the same shape in float64."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    d = (a - b).abs()
    denom = b.abs().max().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.numel() else 1.0
    return Delta(d.max().item() if d.numel() else 0.0, (d.max() / denom).item() if d.numel() else 0.0,
                 torch.linalg.vector_norm(a - b).item(), cos)  # fmt: skip


def checkpoint_diff(a: str | Path, b: str | Path) -> dict[str, float]:
    """Per hub tensor max|Δ| between two checkpoints; inf where the dtypes differ (a round trip
    must keep them)."""
    return {
        n: s["max_abs"] if s["same_dtype"] else float("inf")
        for n, s in checkpoint_diff_stats(a, b).items()
    }


def checkpoint_diff_stats(a: str | Path, b: str | Path) -> dict[str, dict]:
    """Per hub tensor max|Δ| and L2 of Δ between two checkpoints of the same model, in any
    formats. Both are read through their family rules, so names and layouts are compared in
    the hub. Raises SlimportError if the tensor sets or shapes differ.
    """
    ma, mb = load(a), load(b)
    try:
        if set(ma.hub) != set(mb.hub):
            raise SlimportError(
                f"{a} and {b} hold different tensors: {name_list(set(ma.hub) ^ set(mb.hub))}"
            )
        out = {}
        for name, pa in ma.hub.items():
            ta, tb = pa.compute(), mb.hub[name].compute()
            if ta.shape != tb.shape:
                raise SlimportError(
                    f"{name}: shape {list(ta.shape)} in {a}, {list(tb.shape)} in {b}"
                )
            same = ta.dtype == tb.dtype
            ref = ta.abs().max().item() if ta.numel() else 0.0  # relative errors divide by it
            if same and torch.equal(ta, tb):
                out[name] = {"max_abs": 0.0, "l2": 0.0, "max_ref": ref, "same_dtype": True}
            else:
                d = ta.double() - tb.double()
                out[name] = {
                    "max_abs": d.abs().max().item(),
                    "l2": torch.linalg.vector_norm(d).item(),
                    "max_ref": ref,
                    "same_dtype": same,
                }
        return out
    finally:
        ma.source.close()
        mb.source.close()
