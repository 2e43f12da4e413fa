"""A quantized Linear's own integers as ggml blocks (Q8_0, Q4_0, Q4_1), with no re-rounding.

ggml's legacy types keep 32 consecutive values of a row in a block with a float16 scale `d`
(and, Q4_1, a float16 minimum `m`). Our integers q with scale s and zero point z per group
(value (q - z) * s, compressed-tensors' signed grid, q in [qmin, qmax]) become, per block:

    Q8_0   d = s, int8 qs = q - z                     value d * qs
    Q4_0   d = s, nibble  = q - z + 8   (0..15)        value d * (nibble - 8)
    Q4_1   d = s, m = (qmin - z) * s, nibble = q - qmin  value d * nibble + m

A group of 32k columns is k blocks with the same d; per-channel and per-tensor scales repeat in
every block of a row. ggml computes these values in float32 exactly as (q - z) * s is computed
(each product has at most 15 significant bits), so the write is lossless exactly when every d
(and m) is a float16 value: checked per tensor, never rounded silently.
"""

from __future__ import annotations

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.io.compressed import WeightArgs
from slimport.io.formats import GGUF_BLOCK as BLOCK
from slimport.io.formats import GGUF_FITS, GGUF_LAYOUTS, scheme_fits


def scheme_name(w: WeightArgs) -> str:
    g = f"g{w.group_size}" if w.granularity == "group" else f"per-{w.granularity}"
    return f"W{w.bits} {g} {'sym' if w.symmetric else 'asym'}"


def fitting_types(w: WeightArgs, in_features: int) -> tuple[str, ...]:
    """The GGUF types that hold integers of this scheme exactly (empty: none)."""
    if in_features % BLOCK or not scheme_fits(w.bits, w.symmetric, w.granularity, w.group_size):
        return ()
    return GGUF_FITS[(w.bits, w.symmetric)]


def check_fits(name: str, w: WeightArgs, in_features: int, gguf_type: str | None) -> str:
    """The type to write `name`'s integers as: `gguf_type`, or the scheme's default; an error
    naming the scheme and what would fit when it cannot be held exactly."""
    fits = fitting_types(w, in_features)
    if gguf_type is None and fits:
        return fits[0]
    if gguf_type in fits:
        return gguf_type
    asked = f"--gguf-type {gguf_type}" if gguf_type else "a quantized GGUF type"
    why = (
        f"holds exactly: {', '.join(fits)}"
        if fits
        else f"fits no GGUF type (weight-only groups of a multiple of 32 columns, and: {GGUF_LAYOUTS})"
    )
    raise SlimportError(
        f"{name}: the quantization scheme {scheme_name(w)} ({in_features} input features) cannot "
        f"be written as {asked} without re-rounding; it {why}",
        hint="pass one of those types, --gguf-type f32 for the dequantized float weights, or "
        "--gguf-requantize to requantize them with gguf-py (lossy)",
    )


def _per_block(p: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """Scales or zero points shaped [1] (tensor) or [rows, groups] -> one per block [rows, blocks]."""
    if p.dim() == 1 or p.numel() == 1:
        return p.reshape(1, 1).expand(rows, blocks)
    return p.repeat_interleave(blocks // p.shape[1], dim=1)


def _fp16(name: str, what: str, exact: torch.Tensor, gguf_type: str) -> np.ndarray:
    """float16 bytes of `exact` (float64), refused unless every value is a float16 value."""
    half = exact.to(torch.float16).contiguous()
    bad = (half.to(torch.float64) != exact) | ~torch.isfinite(half)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        example = f"{float(exact.reshape(-1)[i]):.9g} -> {float(half.reshape(-1)[i]):.9g}"
        raise SlimportError(
            f"{name}: {int(bad.sum())} of {bad.numel()} block {what} are not float16 values "
            f"(e.g. {example}), so {gguf_type.upper()} cannot hold these integers exactly",
            hint="quantize with `gguf_compatible: true` (slimport quantize --gguf-compatible) so "
            "scales are float16, or pass --gguf-requantize to requantize with gguf-py (lossy)",
        )
    return half.numpy().view(np.uint8).reshape(*half.shape, 2)


def _nibbles(u: torch.Tensor) -> np.ndarray:
    """[rows, blocks, 32] values 0..15 -> [rows, blocks, 16] bytes, ggml's order (low half of the
    block in the low nibbles)."""
    u = u.to(torch.uint8)
    return (u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4)).numpy()


def encode(
    name: str,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    gguf_type: str,
) -> np.ndarray:
    """ggml blocks [rows, blocks * type bytes] (uint8) of integers q [rows, cols] with scale and
    zero point [1] or [rows, groups]; an error when a value or a scale does not fit exactly."""
    rows, cols = q.shape
    nb = cols // BLOCK
    s = _per_block(scale.to(torch.float64), rows, nb)
    z = _per_block(zero.to(torch.int32), rows, nb)
    q = q.to(torch.int32).reshape(rows, nb, BLOCK)
    qmin = -(2 ** (bits - 1))
    # what the block stores: q - z (Q8_0, Q4_0 less its offset 8) or q - qmin (Q4_1)
    v = q - qmin if gguf_type == "q4_1" else q - z[..., None]
    lo, hi = {"q8_0": (-128, 127), "q4_0": (-8, 7), "q4_1": (0, 15)}[gguf_type]
    if not bool(((v >= lo) & (v <= hi)).all()):
        raise SlimportError(
            f"{name}: its {bits}-bit integers give block values in [{int(v.min())}, "
            f"{int(v.max())}], outside {gguf_type.upper()}'s [{lo}, {hi}]",
            hint="write this scheme as a type it fits, or pass --gguf-requantize (lossy)",
        )
    d = _fp16(name, "scales", s, gguf_type)
    if gguf_type == "q8_0":
        parts = [d, v.to(torch.int8).numpy().view(np.uint8)]
    elif gguf_type == "q4_0":
        parts = [d, _nibbles(v + 8)]
    else:
        m = _fp16(
            name, "minimums (-zero point x scale)", (qmin - z).to(torch.float64) * s, gguf_type
        )
        parts = [d, m, _nibbles(v)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
