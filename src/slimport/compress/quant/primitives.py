"""Integer grids, scales and zero points: the arithmetic every quantizer shares.

The convention is compressed-tensors' (so what we save is what vLLM/transformers compute):
integers live in the signed range [-2^(b-1), 2^(b-1)-1]; symmetric scale = absmax / ((2^b-1)/2)
with zero point 0; asymmetric scale = (max-min) / (2^b-1), zero point = round(qmin - min/scale).
0.0 is always representable. Dequantized value = (q - zero_point) * scale.
A granule (row, group) whose values are all zero gets the scale float32 eps: every value maps
to the zero point and dequantizes to exactly 0.
"""

from __future__ import annotations

import torch

from slimport.compress.quant.config import QuantArgs
from slimport.errors import SlimportError


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, fp16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued float) zero point from observed ranges, any shape.

    fp16: the scale is the nearest float16 value, and asymmetric (qmin - zero) * scale too (the
    minimum of a GGUF Q4_1 block): where it is not, the scale keeps 7 significant bits, so any
    multiple by 0..15 fits float16's 11 (a relative change of at most 2^-7)."""
    qmin, qmax = qrange(bits)
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    if fp16:
        scale = _as_fp16(scale)
    if not symmetric:
        zero = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
        if fp16:
            low = (qmin - zero) * scale
            inexact = low.to(torch.float16).to(low.dtype) != low
            mantissa, exponent = torch.frexp(scale)
            short = _as_fp16(torch.ldexp(torch.round(mantissa * 128) / 128, exponent))
            scale = torch.where(inexact, short, scale)
            zero = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
    return scale, zero


def check_scale(name: str, scale: torch.Tensor) -> None:
    """Refuse to keep a scale that is not finite and positive (finite weights whose range
    exceeds float32, e.g. -3e38..3e38, overflow max - min): stored, it would make every loader
    compute NaN."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        raise SlimportError(
            f"tensor {name!r}: its quantization scale at {at} would be {float(scale[tuple(at)])}: "
            "the values' range is beyond what a float32 scale holds",
            hint="the checkpoint is damaged, or keep this layer in float with --protect",
        )


def _as_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def weight_qparams(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs):
    """qparams of weight ranges under `args` (float16 scales when args.fp16_scales)."""
    return qparams(xmin, xmax, args.bits, args.symmetric, args.fp16_scales)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (as float tensor) on the grid; scale/zero broadcast against x."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale + zero), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def _grouped(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View x [rows, cols] as [rows, groups, size] for the args' granularity."""
    if args.granularity == "tensor":
        return x.reshape(1, 1, -1)
    if args.granularity in ("channel", "token"):
        return x.reshape(x.shape[0], 1, -1)
    size = args.group_size
    if x.shape[-1] % size:
        raise ValueError(f"{x.shape[-1]} columns are not a multiple of group size {size}")
    return x.reshape(x.shape[0], -1, size)


def minmax(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule min and max of a 2-D tensor, shaped like its scales ([rows, groups] or [1])."""
    g = _grouped(x, args)
    lo, hi = g.amin(-1), g.amax(-1)
    if args.granularity == "tensor":
        return lo.reshape(1), hi.reshape(1)
    return lo, hi


def expand(p: torch.Tensor, shape: torch.Size, args: QuantArgs) -> torch.Tensor:
    """Broadcast [rows, groups] (or [1]) scales over a [rows, cols] tensor."""
    if args.granularity == "tensor":
        return p.reshape(1, 1)
    if args.granularity == "group":
        rows, groups = p.shape
        return p[:, :, None].expand(rows, groups, args.group_size).reshape(shape)
    return p.reshape(-1, 1)


def _per_granule(p: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Scales shaped to broadcast against the [rows, groups, size] view of _grouped."""
    return p.reshape(1, 1, 1) if args.granularity == "tensor" else p.reshape(p.shape[0], -1, 1)


def quantize_tensor(
    x: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """Integers of a 2-D tensor for given scales (shaped as minmax returns)."""
    g = _grouped(x, args)
    q = quantize(g, _per_granule(scale, args), _per_granule(zero, args), args.bits)
    return q.reshape(x.shape)


def dequantize_tensor(
    q: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    g = _grouped(q, args)
    return dequantize(g, _per_granule(scale, args), _per_granule(zero, args)).reshape(q.shape)


def fake_quantize(
    x: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """Quantize then dequantize a 2-D tensor, exactly as a loader of the saved integers would."""
    g = _grouped(x, args)
    s, z = _per_granule(scale, args), _per_granule(zero, args)
    return dequantize(quantize(g, s, z, args.bits), s, z).reshape(x.shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward: the straight-through estimator of QAT."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(
    x: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """`fake_quantize` that trains: gradients reach x through the rounding (zero outside the
    grid, as the clamp says) and reach the scale as LSQ's (Esser et al. 2020)."""
    g = _grouped(x, args)
    s, z = _per_granule(scale, args), _per_granule(zero, args)
    qmin, qmax = qrange(args.bits)
    return ((torch.clamp(round_ste(g / s + z), qmin, qmax) - z) * s).reshape(x.shape)


def rtn(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a weight [out, in] with min-max ranges: (q, scale, zero)."""
    scale, zero = weight_qparams(*minmax(w, args), args)
    return quantize_tensor(w, args, scale, zero), scale, zero


def dynamic_fake_quantize(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Per-token (last dim) or per-tensor quantization computed on the fly (dynamic activations)."""
    flat = x.reshape(-1, x.shape[-1])
    scale, zero = qparams(*minmax(flat, args), args.bits, args.symmetric)
    return fake_quantize(flat, args, scale, zero).reshape(x.shape)
