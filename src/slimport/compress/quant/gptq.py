"""GPTQ (Frantar et al., 2022): quantize a Linear's weight column by column, feeding each column's
rounding error forward onto the columns not yet quantized so the layer's *output* error
tr((W-Q) H (W-Q)^T) stays small, where H = 2/n sum x x^T over calibration inputs.

Same algorithm as the reference code / GPTQModel: dead inputs zeroed, relative damping, the upper
Cholesky factor of H^-1, lazy block updates, optional act_order (columns by decreasing H_ii).
With act_order and groups the group qparams are fixed up front from the unpermuted weight
("static groups"), so a saved checkpoint needs no g_idx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs
from slimport.compress.quant.observers import mse_weight_qparams
from slimport.errors import SlimportError


class Hessian:
    """Accumulates H = 2/n * sum x x^T over calibration tokens for one Linear input.

    The sum is float32, added to in place by one matmul per batch (no per-batch temporary the
    size of H: at 5632 inputs that is 127 MB); GPTQ's reference code accumulates the same way."""

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
            self.sum = torch.zeros(self.in_features, self.in_features, device=x.device)
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The inputs became x / s (a folded smoothing/AWQ scale): H becomes H / (s s^T)."""
        if self.sum is not None:
            self.sum.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))

    def value(self) -> torch.Tensor:
        """H as a new tensor; the accumulator stays usable."""
        self._check()
        return self.sum * (2.0 / self.n)

    def take(self) -> torch.Tensor:
        """H, computed in the accumulator's own memory, which this Hessian gives up."""
        self._check()
        h, self.sum = self.sum.mul_(2.0 / self.n), None
        return h

    def _check(self) -> None:
        if self.n == 0 or self.sum is None:
            raise SlimportError(
                "GPTQ: no calibration tokens reached this layer",
                hint="give calibration samples (calib_data, num_samples) that reach every layer",
            )
        if not torch.isfinite(self.sum).all():
            raise SlimportError(
                "GPTQ: calibration inputs contain NaN/Inf",
                hint="check the model weights and the calibration text",
            )


def _qparams(w: torch.Tensor, args: QuantArgs, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero of a 2-D slice, shaped as primitives.minmax returns for `args`."""
    if observer == "mse":
        return mse_weight_qparams(w, args)
    if observer != "min_max":
        raise SlimportError(f"GPTQ: unknown weight_observer {observer!r}", hint="min_max or mse")
    return P.weight_qparams(*P.minmax(w, args), args)


class GPTQResult(NamedTuple):
    q: torch.Tensor  # integers as floats, original column order
    scale: torch.Tensor  # shaped like primitives.minmax: [out, groups] / [out, 1] / [1]
    zero: torch.Tensor
    loss: torch.Tensor  # [out]: row r's (w_r - q_r) H_damped (w_r - q_r)^T, what GPTQ minimised


def _inverse_cholesky_factor(
    H: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, damp: float, like: torch.Tensor
) -> torch.Tensor:
    """Upper Cholesky factor U of Hp^-1 (Hp^-1 = U^T U), Hp = H permuted by `perm`, dead inputs'
    diagonal set to 1, damped by damp * mean(diag); dtype and device of `like`.

    With J the flip (exchange) matrix, J Hp J = L L^T gives Hp = R R^T for the upper triangular
    R = J L J, so Hp^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J (upper, positive diagonal: the factor
    is unique). One Cholesky and one in-place triangular solve, at most two n x n matrices alive
    besides H (the textbook way, invert and factor again, takes 5x the time and more copies)."""
    n = H.shape[0]
    rev = perm.flip(0).to(H.device)
    Hf = H[rev.unsqueeze(1), rev].to(like)
    Hf.diagonal()[dead[rev].to(Hf.device)] = 1.0
    Hf.diagonal().add_(damp * Hf.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(Hf)
    del Hf
    if info != 0:
        raise SlimportError(
            f"GPTQ: the damped Hessian ({n}x{n}) is not positive definite (damp={damp})",
            hint="raise gptq.damp (e.g. 0.1), or give more / more varied calibration samples",
        )
    Linv = torch.eye(n, dtype=L.dtype, device=L.device)
    torch.linalg.solve_triangular(L, Linv, upper=False, out=Linv)
    del L
    return Linv.flip(0, 1)


def gptq(
    w: torch.Tensor | Sequence[torch.Tensor],
    H: torch.Tensor | Hessian,
    args: QuantArgs,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    weight_observer: str = "min_max",
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize w [out, in] given the input Hessian H [in, in].

    w may be a list of weights that share the input (q/k/v): GPTQ treats rows independently, so
    quantizing them stacked gives what one call each would, with one Cholesky and one column
    loop; the results are then for the stacked rows. H is a tensor, left as it is, or a
    `Hessian` accumulator, which is consumed: then no n x n matrix outlives the one working
    copy (at 5632 inputs each is 127 MB), so the peak is two.
    Computes in float64 when w is float64 (tests use that to compare against a reference
    exactly), float32 otherwise. `mask` [rows, in] (True = pruned, e.g. by SparseGPT) holds
    those weights at exactly zero (integer = zero point), their error fed forward like any other."""
    if isinstance(H, Hessian):
        H = H.take()
    ws = [w] if isinstance(w, torch.Tensor) else list(w)
    for x in ws:
        if x.ndim != 2 or H.shape != (x.shape[1], x.shape[1]):
            raise ValueError(
                f"GPTQ: weight {tuple(x.shape)} and Hessian {tuple(H.shape)} do not match"
            )
    if block_size <= 0:
        raise ValueError(f"GPTQ: block_size must be positive, got {block_size}")
    dtype = torch.float64 if ws[0].dtype == torch.float64 else torch.float32
    W = torch.cat([x.detach().to(dtype) for x in ws]) if len(ws) > 1 else ws[0].to(dtype, copy=True)
    del ws, w  # the working copy is the only one GPTQ holds
    rows, cols = W.shape
    grouped = args.granularity == "group"
    g = args.group_size if grouped else cols
    if grouped and cols % g:
        raise ValueError(f"GPTQ: {cols} columns are not a multiple of group size {g}")
    ch_args = QuantArgs(
        args.bits, args.symmetric, "channel", fp16_scales=args.fp16_scales
    )  # one group's columns
    qmin, qmax = P.qrange(args.bits)

    # inputs that never fire carry no information: quantize those weights to exactly 0
    dead = H.diagonal() == 0
    W[:, dead] = 0.0

    static = not grouped or act_order  # qparams fixed before any error feedback
    if static:
        scale, zero = _qparams(W, args, weight_observer)

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm]  # the unpermuted copy is freed here
    if mask is not None:
        if mask.shape != W.shape:
            raise ValueError(
                f"GPTQ: mask {tuple(mask.shape)} does not match weight {tuple(W.shape)}"
            )
        mask = mask.to(W.device)[:, perm]
    U = _inverse_cholesky_factor(H, perm, dead, damp, like=W)
    del H
    if static:  # the group (original order) of every permuted column
        group_of = perm // g if grouped else torch.zeros_like(perm)
        scale2, zero2 = scale.reshape(scale.shape[0], -1), zero.reshape(zero.shape[0], -1)

    Q = torch.empty_like(W)  # in the original column order
    where = perm.tolist()
    dyn_scales, dyn_zeros = [], []
    loss = torch.zeros(rows, dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2]  # a view: updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        if static:  # this block's columns' scale/zero [rows or 1, block]
            bs, bz = scale2[:, group_of[i1:i2]], zero2[:, group_of[i1:i2]]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                s, z = bs[:, i], bz[:, i]
            elif j % g == 0:  # a new group: its range from the *current* (updated) columns
                cur = W1[:, i : i + g]
                if j + g > i2:  # part of the group is past this block: apply pending updates
                    rest = W[:, i2 : j + g] - Err1[:, :i] @ U[i1:j, i2 : j + g]
                    cur = torch.cat([cur, rest], 1)
                s, z = _qparams(cur, ch_args, weight_observer)
                s, z = s.reshape(-1), z.reshape(-1)
                dyn_scales.append(s)
                dyn_zeros.append(z)
            col = W1[:, i]
            q = torch.round(col / s + z).clamp_(qmin, qmax)  # = primitives.quantize
            if mask is not None:
                q = torch.where(mask[:, j], z, q)  # dequantizes to exactly 0
            Q[:, where[j]] = q
            err = Err1[:, i]
            torch.sub(col, (q - z) * s, out=err).div_(U1[i, i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # OBS update of the columns still to go
        loss += Err1.pow(2).sum(1)  # OBS: each column adds err^2 to the output error
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # lazy update of the later blocks

    if not static:
        scale, zero = torch.stack(dyn_scales, 1), torch.stack(dyn_zeros, 1)
    return GPTQResult(Q.float(), scale.float(), zero.float(), loss)
