"""Packed quantized layers for CPU inference: integers, scales and zero points, no float weight.

A weight [N, K] of b-bit integers q with scales s and optional zero points z, per row or per group
of columns, stands for (q - z) * s (compressed-tensors' convention, integers signed). It is held
in one of three layouts, chosen once when the module is built:

  int8      int8 [N, K]            5..8 bits
  nibbles   uint8 [N, K/2]         3..4 bits, q + 8, two per byte (low nibble = even column)
  int4pack  uint8 [N, K/2]         3..4 bits in the layout of PyTorch's CPU int4 kernel, with
                                   `scales_and_zeros` [K/g, N, 2] in place of s and z

and computes x @ W.T for x [M, K] in the compute dtype:

  float32             dequantize per call: the very arithmetic of the dequantized reference
  bfloat16, M small   aten's weight-only kernels: _weight_int8pack_mm (8 bits, one scale per
                      row) and _weight_int4pack_mm_for_cpu (<= 4 bits, groups of 32..256 or a
                      multiple, N % 16 == 0); they are fast only with bf16 activations
  bfloat16, M large   dequantize this layer transiently, fp32 GEMM (beats the kernels at prefill)
  anything else       dequantize per call (other group sizes, N % 16 != 0, odd K)
  int8 inputs (W8A8)  torch._int_mm on the integers, zero points folded in (any dtype, exact)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
# From this many rows (tokens) on, dequantizing the layer once and running a dense fp32 GEMM beats
# the weight-only kernels, whose cost grows linearly with M. Measured on SmolLM2's 1536x576 and
# 576x1536 (Xeon AVX-512, 1 thread, busy machine): int4 kernel 6.7 / 14 / 28 ms at M = 128 / 256
# / 512, dequantize-to-fp32 + GEMM 10-19 / 16-21 / 25-27 ms: they cross near M = 256-512.
PREFILL_ROWS = 256


@functools.cache
def int4_layout() -> tuple[int, bool] | None:
    """(rows per block, halves) of `_convert_weight_to_int4pack_for_cpu` on this CPU, or None.

    The layout depends on the ISA the kernel was dispatched to (AVX-512: blocks of 64 rows, a
    byte holding rows r and r+32; AVX2: 32 rows, r and r+16; scalar: neighbouring rows), so it is
    found by packing a probe and checking which decoding gives it back.
    """
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return None
    n, k = 112, 64  # 64 + 48 and 3 * 32 + 16 rows: full and partial blocks of every candidate
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = convert(q, 1)
    for layout in ((64, True), (32, True), (32, False)):
        if torch.equal(_int4pack_unpack(packed, n, k, layout).to(torch.int32), q):
            return layout
    return None


def _int4pack_unpack(packed: torch.Tensor, n: int, k: int, layout: tuple[int, bool]):
    """The kernel layout back to uint8 [N, K] (values 0..15)."""
    block, halves = layout
    flat = packed.reshape(-1)
    full, cut = n // block, (n // block) * k * block // 2
    parts = []
    if full:
        b = flat[:cut].view(full, k, block // 2)
        lo, hi = b & 15, b >> 4
        v = torch.cat([lo, hi], -1) if halves else torch.stack([lo, hi], -1).flatten(2)
        parts.append(v.transpose(1, 2).reshape(full * block, k))
    if n > full * block:  # a last, narrower block: always neighbouring rows
        b = flat[cut:].view(k, (n - full * block) // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).flatten(1).T)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _int4pack_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor, layout):
    """Rows `rows` of the kernel layout as uint8 [len(rows), K], without unpacking the rest."""
    block, halves = layout
    flat = packed.reshape(-1)
    full, cut = n // block, (n // block) * k * block // 2
    in_full = rows < full * block
    r = torch.where(in_full, rows % block, rows - full * block)
    if halves:
        byte = torch.where(in_full, r % (block // 2), r // 2)
        shift = torch.where(in_full, r // (block // 2), r % 2) * 4
    else:
        byte, shift = r // 2, (r % 2) * 4
    width = torch.where(in_full, block // 2, (n - full * block) // 2)
    start = torch.where(in_full, (rows // block) * k * (block // 2), cut)
    cols = torch.arange(k)
    index = start[:, None] + cols[None, :] * width[:, None] + byte[:, None]
    return (flat[index] >> shift[:, None].to(torch.uint8)) & 15


def _per_column(t: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, groups] -> [rows, groups * group]: each group's value repeated over its columns."""
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).flatten(1).view(torch.int8) - 8


def kernel_for(bits: int, shape: tuple[int, int], group: int, dtype: torch.dtype) -> str | None:
    """The aten weight-only kernel that computes this scheme, or None (dequantize per call)."""
    n, k = shape
    if dtype != torch.bfloat16:
        return None
    if bits > 4:
        return "int8" if group == k else None
    fits = n % 16 == 0 and any(group % g == 0 for g in INT4_KERNEL_GROUPS)
    return "int4" if fits and int4_layout() is not None else None


class PackedWeight(nn.Module):
    """An [N, K] weight held as integers; `mm(x)` = x @ W.T, `rows(i)` = W[i] (embeddings).

    `q` int [N, K] (signed, `bits` wide), `scale` [N, G], `zero` [N, G] or None (symmetric);
    G groups of K / G columns (1 = per row). `dtype` is the compute dtype.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        bits: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        n, k = q.shape
        groups = scale.shape[1]
        if scale.shape[0] != n or k % groups or (zero is not None and zero.shape != scale.shape):
            raise ValueError(f"scales {list(scale.shape)} do not fit a weight {[n, k]}")
        self.shape, self.bits, self.group, self.dtype = (n, k), bits, k // groups, dtype
        self.kernel = kernel_for(bits, self.shape, self.group, dtype)
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.register_buffer("scales_and_zeros", None)
        if self.kernel == "int4":
            self.layout = "int4pack"
            self.kernel_group = next(g for g in INT4_KERNEL_GROUPS if self.group % g == 0)
            u = (q.to(torch.int32) + 8).contiguous()
            self.register_buffer(
                "qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            )
            del u
            s = scale.float().repeat_interleave(self.group // self.kernel_group, dim=1)
            # the kernel computes (u - 8) * s + z with u = q + 8, i.e. q * s + z: z = -zero * s
            z = (
                torch.zeros_like(s)
                if zero is None
                else -zero.float().repeat_interleave(self.group // self.kernel_group, dim=1) * s
            )
            sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(dtype)
            self.register_buffer("scales_and_zeros", sz)
            return
        self.layout = "nibbles" if bits <= 4 and k % 2 == 0 else "int8"
        ints = _pack_nibbles(q) if self.layout == "nibbles" else q.to(torch.int8).contiguous()
        self.register_buffer("qweight", ints)
        self.register_buffer("scale", scale.to(dtype).contiguous())
        if zero is not None:
            self.register_buffer("zero", zero.to(torch.int8).contiguous())

    def _ints(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Signed integers [N or len(rows), K] (int8), or for int4pack the 0..15 values."""
        n, k = self.shape
        if self.layout == "int4pack":
            if rows is None:
                return _int4pack_unpack(self.qweight, n, k, int4_layout())
            return _int4pack_rows(self.qweight, n, k, rows, int4_layout())
        q = self.qweight if rows is None else self.qweight[rows]
        return _unpack_nibbles(q) if self.layout == "nibbles" else q

    def _dequantize(self, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        # scales widened to one per column first: elementwise ops on contiguous [N, K] tensors
        # run 4x faster than the same ops broadcasting [N, G, 1] over [N, G, K/G]
        q = self._ints(rows)
        if self.layout == "int4pack":
            sz = self.scales_and_zeros if rows is None else self.scales_and_zeros[:, rows]
            s, z = sz.transpose(0, 1).to(dtype).unbind(-1)  # [rows, K/g]
            g = self.kernel_group
            # (u - 8) * s + z in one pass: u * s + (z - 8 s)
            return torch.addcmul(_per_column(z - 8 * s, g), q.to(dtype), _per_column(s, g))
        scale = self.scale if rows is None else self.scale[rows]
        w = q.float()
        if self.zero is not None:
            zero = self.zero if rows is None else self.zero[rows]
            w = w - _per_column(zero.float(), self.group)
        return (w * _per_column(scale.float(), self.group)).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] (transient: nothing keeps it)."""
        return self._dequantize(None, dtype or self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[index] [len, K]: an embedding lookup touching only those rows."""
        return self._dequantize(index.reshape(-1), self.dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W.T -> [M, N]."""
        if self.kernel is None or x.shape[0] >= PREFILL_ROWS:
            # fp32 GEMM: on AVX-512 CPUs without AMX a bf16 GEMM is ~2x slower than fp32
            y = nn.functional.linear(x.float(), self.dequantize(torch.float32))
            return y.to(x.dtype)
        x = x.to(self.dtype).contiguous()
        if self.kernel == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.qweight, self.kernel_group, self.scales_and_zeros
            )
        scale = self.scale.view(-1)
        y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, scale)
        if self.zero is not None:  # sum_k x (q - z) s = kernel - (sum_k x) * z * s
            zs = self.zero.view(-1).float() * scale.float()
            y = (y.float() - x.float().sum(-1, keepdim=True) * zs).to(y.dtype)
        return y

    @property
    def int_mm_fits(self) -> bool:
        """8-bit integers, one scale per row, shapes torch._int_mm takes."""
        n, k = self.shape
        return self.layout == "int8" and self.group == k and n % 8 == 0 and k % 8 == 0

    def int_mm(self, qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor) -> torch.Tensor:
        """(qx - zx) sx @ ((q - z) s).T for quantized inputs, in fp32: an int8 GEMM (oneDNN,
        VNNI) with the zero points folded in as int32 corrections, exact until the last
        scaling. Measured on SmolLM2 shapes (1 thread): 0.45 ms vs 2.5 ms fp32 dense and 16 ms
        dequantize-per-call at M = 32; 47 us vs 320 us for _weight_int8pack_mm at M = 1."""
        k = self.shape[1]
        q = self.qweight
        xi, zi = qx.to(torch.int8), zx.to(torch.int32)
        acc = torch._int_mm(xi, q.T)
        if zi.any():
            acc -= zi * q.sum(1, dtype=torch.int32)
        if self.zero is not None:
            zw = self.zero.view(1, -1).to(torch.int32)
            acc -= xi.sum(1, keepdim=True, dtype=torch.int32) * zw
            acc += k * zi * zw
        return acc.float() * sx.float() * self.scale.view(1, -1).float()

    def extra_repr(self) -> str:
        n, k = self.shape
        g = "row" if self.group == k else f"g{self.group}"
        sym = "sym" if self.zero is None and self.layout != "int4pack" else "zp"
        return f"{k}->{n}, w{self.bits} {g} {sym}, {self.layout}, kernel={self.kernel}"


class InputQuant(nn.Module):
    """8-bit input quantization as the checkpoint computes it: per token at run time (dynamic) or
    with a calibrated per-tensor scale and zero point (static)."""

    def __init__(self, args: QuantArgs, scale=None, zero=None) -> None:
        super().__init__()
        self.args = args
        self.register_buffer("scale", None if scale is None else scale.float().reshape(1))
        self.register_buffer("zero", None if zero is None else zero.float().reshape(1))

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integers as floats, scale, zero point) of x [M, K]: per row when dynamic."""
        if self.args.dynamic:
            scale, zero = P.qparams(*P.minmax(x, self.args), self.args.bits, self.args.symmetric)
        else:
            scale, zero = self.scale.to(x.dtype), self.zero.to(x.dtype)
        return P.quantize(x, scale, zero, self.args.bits), scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.dequantize(*self.integers(x))


class PackedLinear(nn.Module):
    """nn.Linear's computation on a PackedWeight (which a tied embedding may share)."""

    def __init__(
        self,
        weight: PackedWeight,
        bias: torch.Tensor | None = None,
        inputs: InputQuant | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = weight
        self.inputs = inputs
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def path(self) -> str:
        """How this layer computes: int_mm, int4, int8 (aten kernels) or dequantize."""
        if self.inputs is not None and self.packed.int_mm_fits:
            return "int_mm"
        return self.packed.kernel or "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.path == "int_mm":
            y = self.packed.int_mm(*self.inputs.integers(x)).to(x.dtype)
        else:
            y = self.packed.mm(x if self.inputs is None else self.inputs(x))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class PackedEmbedding(nn.Module):
    """nn.Embedding's lookup on a PackedWeight: only the looked-up rows are dequantized."""

    def __init__(self, weight: PackedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.packed = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed.rows(ids).reshape(*ids.shape, self.embedding_dim)
