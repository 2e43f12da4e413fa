"""SparseGPT (Frantar & Alistarh, 2023): prune a Linear's weight column by column with the OBS
update, so the layer's output error tr((W-W') H (W-W')^T) stays small, H = 2/n sum x x^T.

The reference algorithm: dead inputs zeroed, relative damping, the upper Cholesky factor U of
H^-1 (shared with GPTQ, quant/gptq.py), lazy-batch updates of `block_size` columns. The mask is
chosen per block by w^2 / U_jj^2 (= w^2 / [H_F^-1]_jj over the columns F not yet processed) on
the weights as the updates left them: unstructured over the block's rows x columns, N:M per
group of M columns of each row at the group's first column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from slimport.compress.prune.masks import count, lowest
from slimport.compress.quant.gptq import _inverse_cholesky_factor


class SparseGPTResult(NamedTuple):
    weight: torch.Tensor  # the pruned, error-compensated weight [out, in]
    mask: torch.Tensor  # True where pruned
    loss: torch.Tensor  # [out]: sum over pruned weights of err^2, the OBS objective


def factor(H: torch.Tensor, damp: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U with H_damped^-1 = U^T U (dead inputs' diagonal set to 1 first), in `dtype`."""
    cols = H.shape[0]
    perm = torch.arange(cols, device=H.device)
    like = torch.empty(0, dtype=dtype, device=H.device)
    return _inverse_cholesky_factor(H, perm, H.diagonal() == 0, damp, like=like)


def sparsegpt(
    w: torch.Tensor | Sequence[torch.Tensor],
    U: torch.Tensor,
    sparsity: float | Sequence[float],
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dead: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prune w [out, in] given U (`factor` of its input Hessian). Exactly round(sparsity * out *
    in) weights are pruned (cumulatively rounded per block), or n of every m for N:M. float64
    when w is float64 (the tests' exact reference), float32 otherwise.

    w may be a list of weights sharing the input (q/k/v), each with its own sparsity: rows are
    independent in the sweep, so one stacked sweep with each part's mask chosen on its own rows
    gives exactly what one call per part would, in one column loop; the result is stacked."""
    ws = [w] if isinstance(w, torch.Tensor) else list(w)
    ss = [sparsity] * len(ws) if isinstance(sparsity, (int, float)) else list(sparsity)
    bounds = torch.tensor([0, *(x.shape[0] for x in ws)]).cumsum(0).tolist()
    parts = list(zip(bounds[:-1], bounds[1:], ss, strict=True))
    w = torch.cat(ws) if len(ws) > 1 else ws[0]
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype, copy=True)
    U = U.to(dtype)
    rows, cols = W.shape
    if U.shape != (cols, cols):
        raise ValueError(f"SparseGPT: weight {tuple(W.shape)} and factor {tuple(U.shape)} differ")
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"SparseGPT: block_size {block_size} is not a multiple of M={nm[1]}")
    if dead is not None:
        W[:, dead] = 0.0
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=dtype, device=W.device)
    d = U.diagonal()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2]  # a view: updated in place
        M1 = mask[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if nm is None:  # each part: this block's share of its count, rounded cumulatively
            score = W1.square() / d[i1:i2].square()
            for r0, r1, s in parts:
                k = count((r1 - r0) * i2, s) - count((r1 - r0) * i1, s)
                M1[r0:r1] = lowest(score[r0:r1].reshape(1, -1), k).reshape(r1 - r0, -1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                M1[:, g] = lowest(W1[:, g].square() / d[i1:i2][g].square(), nm[0])
            col = W1[:, i]
            err = Err1[:, i]
            torch.where(M1[:, i], col, torch.zeros_like(col), out=err).div_(U1[i, i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # OBS update; zeroes the pruned weights
        loss += Err1.square().sum(1)
        W1[M1] = 0.0  # exactly: the update leaves rounding dust
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # lazy update of the later blocks
    return SparseGPTResult(W, mask, loss)
