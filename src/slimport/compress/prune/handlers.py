"""The pruning handlers (see compress/handlers.py): each zeroes weights of the block's float
Linears in place and records the masks in `work.masks`, so a later rounding (GPTQ) keeps those
weights at exactly zero while it quantizes the ones kept."""

from __future__ import annotations

import time

import torch

from slimport.compress.capture import Needs
from slimport.compress.handlers import BlockWork, handler_for, handles
from slimport.compress.modifiers import MagnitudeConfig, PruneModifier, SparseGPTConfig, WandaConfig
from slimport.compress.prune import masks
from slimport.compress.prune.sparsegpt import factor, sparsegpt
from slimport.errors import SlimportError


def _prune(m: PruneModifier, work: BlockWork, name: str, new: torch.Tensor, mask, t0) -> None:
    lin = work.linears[name]
    with torch.no_grad():
        lin.weight.copy_(new.to(lin.weight.dtype))
    work.masks[name] = mask
    row = work.rows[name]
    row["seconds"] += time.perf_counter() - t0
    row["sparsity"] = float(mask.float().mean())
    row["pattern"] = m.pattern


def _targets(m: PruneModifier, work: BlockWork) -> dict[str, float]:
    """The block's Linears this modifier prunes, with their sparsity."""
    out = {n: m.sparsity_of(work.rows[n]["module"]) for n in work.linears}
    return {n: s for n, s in out.items() if s > 0}


@handles(MagnitudeConfig)
def magnitude(m: MagnitudeConfig, work: BlockWork) -> None:
    for n, s in _targets(m, work).items():
        t0 = time.perf_counter()
        w = work.linears[n].weight.detach().float()
        mask = masks.select(w.abs(), s, m.nm, per_row=False)
        _prune(m, work, n, w.masked_fill(mask, 0.0), mask, t0)


@handles(WandaConfig, needs=lambda m: Needs(sqnorm=True))
def wanda(m: WandaConfig, work: BlockWork) -> None:
    for n, s in _targets(m, work).items():
        t0 = time.perf_counter()
        w = work.linears[n].weight.detach().float()
        sq = work.stats[n].sqnorm
        if sq is None:
            raise SlimportError(f"{work.rows[n]['module']}: no calibration tokens reached it")
        mask = masks.select(w.abs() * sq.sqrt().unsqueeze(0), s, m.nm, per_row=True)
        _prune(m, work, n, w.masked_fill(mask, 0.0), mask, t0)


@handles(SparseGPTConfig, needs=lambda m: Needs(hessian=True))
def sparse_gpt(m: SparseGPTConfig, work: BlockWork) -> None:
    targets = _targets(m, work)
    shared: dict[int, list[str]] = {}  # Linears fed one input share its Hessian and its factor
    for n in targets:
        shared.setdefault(id(work.stats[n]), []).append(n)
    keep = any(handler_for(x).needs(x).hessian for x in work.later)  # GPTQ after: H stays
    for names in shared.values():
        t0 = time.perf_counter()
        st = work.stats[names[0]]
        H = st.hessian.value() if keep else st.hessian.take()
        dead = H.diagonal() == 0
        U = factor(H, m.damp)
        del H
        ws = [work.linears[n].weight.detach().float() for n in names]
        r = sparsegpt(ws, U, [targets[n] for n in names], m.nm, m.block_size, dead)
        del U
        seconds = (time.perf_counter() - t0) / len(names)
        sizes = [w.shape[0] for w in ws]
        parts = zip(names, *(t.split(sizes) for t in r[:3]), strict=True)
        for n, w, mask, loss in parts:
            _prune(m, work, n, w, mask, time.perf_counter() - seconds)
            work.rows[n]["prune_err"] = float(loss.sum()) / max(1, w.shape[0])
