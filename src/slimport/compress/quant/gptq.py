"""GPTQ (Frantar et al., 2022): quantize a Linear's weight column by column, feeding each column's
rounding error forward onto the columns not yet quantized so the layer's *output* error
tr((W-Q) H (W-Q)^T) stays small, where H = 2/n sum x x^T over calibration inputs.

Same algorithm as the reference code / GPTQModel: dead inputs zeroed, relative damping, the upper
Cholesky factor of H^-1, lazy block updates, optional act_order (columns by decreasing H_ii).
With act_order and groups the group qparams are fixed up front from the unpermuted weight
("static groups"), so a saved checkpoint needs no g_idx.
"""

from __future__ import annotations

import torch

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs
from slimport.compress.quant.observers import mse_weight_qparams
from slimport.errors import SlimportError


class Hessian:
    """Accumulates H = 2/n * sum x x^T over calibration tokens for one Linear input.

    Each batch's x^T x is a float32 matmul (the expensive part); the running sum is float64 so
    thousands of batches lose nothing to accumulation order. It lives on the first batch's device."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Hessian of {self.in_features} inputs got x of shape {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return
        if self.sum is None:
            self.sum = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float64, device=x.device
            )
        self.sum += (x.T @ x).to(self.sum)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise SlimportError(
                "GPTQ: no calibration tokens reached this layer",
                hint="give calibration samples (calib_data, num_samples) that reach every layer",
            )
        h = self.sum.float().mul_(2.0 / self.n)  # no float64 temporary: 5632^2 is 254 MB
        if not torch.isfinite(h).all():
            raise SlimportError(
                "GPTQ: calibration inputs contain NaN/Inf",
                hint="check the model weights and the calibration text",
            )
        return h


def _qparams(w: torch.Tensor, args: QuantArgs, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero of a 2-D slice, shaped as primitives.minmax returns for `args`."""
    if observer == "mse":
        return mse_weight_qparams(w, args)
    if observer != "min_max":
        raise SlimportError(f"GPTQ: unknown weight_observer {observer!r}", hint="min_max or mse")
    return P.qparams(*P.minmax(w, args), args.bits, args.symmetric)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so that H^-1 = U^T U."""
    n = H.shape[0]
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        # H^-1 = L^-T L^-1 (torch.cholesky_inverse is ~20x slower on CPU at these sizes)
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        U, info = torch.linalg.cholesky_ex(Linv.T @ Linv, upper=True)
    if info != 0:
        raise SlimportError(
            f"GPTQ: the damped Hessian ({n}x{n}) is not positive definite (damp={damp})",
            hint="raise gptq.damp (e.g. 0.1), or give more / more varied calibration samples",
        )
    return U


def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    args: QuantArgs,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    weight_observer: str = "min_max",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [out, in] given the input Hessian H [in, in].

    Returns (q, scale, zero): q the integers (float tensor, original column order), scale/zero
    shaped like primitives.minmax ([out, groups] / [out, 1] / [1]). Computes in float64 when w is
    float64 (tests use that to compare against a reference exactly), float32 otherwise."""
    if w.ndim != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ: weight {tuple(w.shape)} and Hessian {tuple(H.shape)} do not match")
    if block_size <= 0:
        raise ValueError(f"GPTQ: block_size must be positive, got {block_size}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    H = H.detach().to(W.device, dtype).clone()
    rows, cols = W.shape
    grouped = args.granularity == "group"
    g = args.group_size if grouped else cols
    if grouped and cols % g:
        raise ValueError(f"GPTQ: {cols} columns are not a multiple of group size {g}")
    ch_args = QuantArgs(args.bits, args.symmetric, "channel")  # for one group's columns

    # inputs that never fire carry no information: quantize those weights to exactly 0
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = grouped and act_order
    if not grouped or static:  # qparams fixed before any error feedback
        scale, zero = _qparams(W, args, weight_observer)

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)
    del H
    group_of = (perm // g).tolist()  # group (original order) of each permuted column

    def col_params(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """scale/zero [rows or 1] of permuted column j (static cases)."""
        if grouped:
            k = group_of[j]
            return scale[:, k], zero[:, k]
        return scale.reshape(-1), zero.reshape(-1)

    Q = torch.zeros_like(W)
    dyn_scales, dyn_zeros = [], []
    s = z = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if grouped and not static:
                if j % g == 0:  # a new group: its range from the *current* (updated) columns
                    cur = W1[:, i : i + g]
                    if j + g > i2:  # part of the group is past this block: apply pending updates
                        rest = W[:, i2 : j + g] - Err1[:, :i] @ U[i1:j, i2 : j + g]
                        cur = torch.cat([cur, rest], 1)
                    s, z = _qparams(cur, ch_args, weight_observer)
                    s, z = s.reshape(-1), z.reshape(-1)
                    dyn_scales.append(s)
                    dyn_zeros.append(z)
            else:
                s, z = col_params(j)
            col = W1[:, i]
            q = P.quantize(col, s, z, args.bits)
            Q[:, j] = q
            err = (col - P.dequantize(q, s, z)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if grouped and not static:
        scale, zero = torch.stack(dyn_scales, 1), torch.stack(dyn_zeros, 1)
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.float(), scale.float(), zero.float()
