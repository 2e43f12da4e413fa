"""AWQ (Lin et al., 2023), as AutoAWQ does it: per input channel scales s that protect the weights
seen by salient (large-activation) channels, and a per-row/group clipping search.

Both searches score a candidate by the output error of the Linears on calibration tokens,
sum ||(W - W_candidate) x||^2. That error is a quadratic form in the weight error, so it is
evaluated through the Gram matrix x^T x whenever that is cheaper than multiplying by the tokens.
"""

from __future__ import annotations

import torch

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs

# awq_scales scores every grid point exactly while that costs at most this many multiply-adds;
# above it, the grid is screened on a sketch of the tokens and the best candidates re-scored
# exactly (alpha=0 always among them, so the result is never worse than RTN on the tokens).
# On SmolLM2-135M activations (4096 tokens; qkv, gate/up, down of layers 2/15/28; w4 g64/g32,
# w4 and w8 per-channel) this picked the exact search's alpha in 34 of 36 cases, at worst +1%
# output error, for 2-3x less work.
EXACT_BUDGET = 8e9
SKETCH_ROWS = 128
REFINE = 2


def _fake_rtn(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """primitives' min-max RTN quantize-dequantize, same operations in the same order (so the
    same values), done in place on a grouped view: this runs once per grid point."""
    scale, zero = P.weight_qparams(*P.minmax(w, args), args)
    qmin, qmax = P.qrange(args.bits)
    g = P._grouped(w, args)
    if args.granularity != "tensor":  # [rows, groups] -> [rows, groups, 1]
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    t = torch.div(g, scale).add_(zero).round_().clamp_(qmin, qmax)
    return t.sub_(zero).mul_(scale).reshape(w.shape)


class _OutputError:
    """sum over tokens and rows of ((W - W') x)^2 for a weight error D = W - W' [out, in]."""

    def __init__(self, x: torch.Tensor, out_features: int, evals: int) -> None:
        n, d = x.shape
        direct = evals * n * d * out_features
        gram = n * d * d + evals * d * d * out_features
        self.gram = gram < direct
        self.m = x.T @ x if self.gram else x

    def __call__(self, D: torch.Tensor) -> float:
        if self.gram:
            return float(((D @ self.m) * D).sum())
        return float((self.m @ D.T).pow(2).sum())

    @staticmethod
    def cost(n: int, d: int, out: int, evals: int) -> float:
        return min(evals * n * d * out, n * d * d + evals * d * d * out)


def _count_sketch(x: torch.Tensor, rows: int) -> torch.Tensor:
    """S x with S a random signed bucket assignment of tokens: E||D (Sx)^T||^2 = ||D x^T||^2,
    at O(n * in) cost (a dense random projection would cost a matmul)."""
    gen = torch.Generator().manual_seed(0)
    n = x.shape[0]
    bucket = torch.randint(0, rows, (n,), generator=gen).to(x.device)
    sign = (torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1).to(x)
    return torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, bucket, x * sign
    )


def _check(x: torch.Tensor, weights: list[torch.Tensor]) -> int:
    d = x.shape[-1]
    for w in weights:
        if w.ndim != 2 or w.shape[1] != d:
            raise ValueError(f"AWQ: weight {tuple(w.shape)} does not take inputs of size {d}")
    return d


def awq_scales(
    x: torch.Tensor, weights: list[torch.Tensor], args: QuantArgs, grid: int = 20
) -> torch.Tensor:
    """Per-input-channel scales s [in] for Linears sharing the input x [n_tokens, in].

    s = mean|x|^alpha normalized by sqrt(max * min), alpha on a grid over [0, 1); the alpha
    minimizing sum_i ||W_i x - Q(W_i diag(s)) diag(1/s) x||^2 wins (Q = RTN with `args`).
    alpha = 0 gives s = 1, so the result is never worse than RTN on these tokens."""
    if not weights:
        raise ValueError("AWQ: no weights to scale for")
    d = _check(x, weights)
    x = x.detach().reshape(-1, d).float()
    ws = [w.detach().float() for w in weights]
    out = sum(w.shape[0] for w in ws)
    x_mean = torch.linalg.vector_norm(x, 1, dim=0) / x.shape[0]  # mean |x| without an |x| copy
    alphas = [i / grid for i in range(grid)]

    def candidate(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        D = torch.cat([w - _fake_rtn(w * s, args) / s for w in ws])
        return s, D

    def best(alphas: list[float], err: _OutputError) -> list[tuple[float, float, torch.Tensor]]:
        scored = []
        for a in alphas:
            s, D = candidate(a)
            scored.append((err(D), a, s))
        return sorted(scored, key=lambda t: (t[0], t[1]))  # ties: the smaller alpha

    n = x.shape[0]
    if n <= SKETCH_ROWS or _OutputError.cost(n, d, out, len(alphas)) <= EXACT_BUDGET:
        return best(alphas, _OutputError(x, out, len(alphas)))[0][2]
    screened = best(alphas, _OutputError(_count_sketch(x, SKETCH_ROWS), out, len(alphas)))
    finalists = sorted({0.0, *(a for _, a, _ in screened[:REFINE])})
    return best(finalists, _OutputError(x, out, len(finalists)))[0][2]


def awq_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    args: QuantArgs,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """AutoAWQ's auto_clip: per output row and group, clip the weight to +-r * max|w| with r in
    {1, 1 - 1/grid, ...} down to 1 - max_shrink, keeping the r whose RTN-quantized weight gives
    the least output error on a strided subsample of n_tokens tokens. Returns the clipped weight.
    Per-tensor quantization searches one r for the whole tensor (its scale is shared)."""
    d = _check(x, [w])
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype)
    x = x.detach().reshape(-1, d).to(W)
    x = x[:: max(1, x.shape[0] // n_tokens)]
    rows = W.shape[0]
    g = args.group_size if args.granularity == "group" else d
    if d % g:
        raise ValueError(f"AWQ: {d} columns are not a multiple of group size {g}")
    ng = d // g
    Wg = W.reshape(rows, ng, g)
    Xg = x.reshape(-1, ng, g).permute(1, 0, 2)  # [ng, tokens, g]
    G = Xg.transpose(1, 2) @ Xg  # per-group Gram blocks [ng, g, g]: the group's own output error

    org_max = Wg.abs().amax(-1, keepdim=True)  # [rows, ng, 1]
    best_max = org_max.clone()
    best_err = None
    for i in range(max(1, int(max_shrink * grid))):
        max_val = org_max * (1 - i / grid)
        cur = torch.clamp(Wg, -max_val, max_val)
        D = (_fake_rtn(cur.reshape(rows, d), args).reshape(rows, ng, g) - Wg).permute(1, 0, 2)
        err = ((D @ G) * D).sum(-1).T  # [rows, ng]
        if args.granularity == "tensor":
            err = err.sum().expand(rows, ng)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    return torch.clamp(Wg, -best_max, best_max).reshape(w.shape).to(w.dtype)
