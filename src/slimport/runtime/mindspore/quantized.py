"""Integer-held weights in MindSpore: a Dense Cell that keeps int8 (W8) or two-per-byte int4
(W4) weights with their scales and zero points, and dequantizes inside `construct`.

The arithmetic is compressed-tensors' (what slimport writes): integers q in the signed range
[-2^(b-1), 2^(b-1)-1], value = (q - zero_point) * scale, one scale per output row and group of
`group_size` input columns. 4-bit integers are stored offset to unsigned nibbles (u = q + 8,
low nibble = even column), so dequantizing computes (u - (zero + 8)) * scale: the same float32
operations on the same exact integers, hence the same weights as torch's dequantized reference.

`dequantize="per_call"` (default) holds only the integers and builds the float weight for each
call (the memory saving is the point); `"at_load"` dequantizes once and computes like a float
Dense (fastest on CPU, no saving). MindSpore's fused `WeightQuantBatchMatmul` would take these
integers directly, but its CPU build refuses it (measured: Ascend only); `_matmul` is the one
place to call it on Ascend.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import torch
from mindspore import nn, ops

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs
from slimport.errors import SlimportError
from slimport.io.compressed import dequantize as dequantize_weight
from slimport.runtime.mindspore.bridge import to_ms

DEQUANTIZE_MODES = ("per_call", "at_load")
EMBEDDINGS = ("int8",)
INT8_ROWS = QuantArgs(8, True, "channel")  # = runtime.torch.quantized.EMBEDDINGS["int8"]
_EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class IntWeight:
    """One quantized weight as a checkpoint holds it: integers [out, in] (signed, as int8),
    scale and zero point [out, groups] (groups = 1 for per-channel, or [1] per tensor)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int


@dataclass(frozen=True)
class IntInput:
    """Input (activation) quantization of one layer: `dynamic` per token at run time, or static
    per tensor with the calibrated `scale` and `zero` ([1] each)."""

    bits: int = 8
    symmetric: bool = False
    dynamic: bool = True
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


class QuantDense(nn.Cell):
    """`nn.Dense` with a weight held as integers; parameters `weight_q`, `weight_scale`,
    `weight_zero` (and `bias`). Computes x @ dequantized(W).T + b."""

    def __init__(
        self,
        weight: IntWeight,
        bias: torch.Tensor | None = None,
        dequantize: str = "per_call",
        inputs: IntInput | None = None,
        name: str = "dense",
    ) -> None:
        super().__init__()
        if dequantize not in DEQUANTIZE_MODES:
            raise SlimportError(
                f"dequantize={dequantize!r}", hint="one of: " + ", ".join(DEQUANTIZE_MODES)
            )
        out_f, in_f = weight.q.shape
        self.in_channels, self.out_channels, self.bits = in_f, out_f, weight.bits
        self.mode = dequantize
        if dequantize == "at_load":  # the float weight once (io's dequantize: the same float ops)
            w = dequantize_weight(weight.q, weight.scale, weight.zero)
            self.weight = ms.Parameter(to_ms(w.contiguous()), "weight", requires_grad=False)
        else:
            self._hold_integers(weight, name)
        self.has_bias = bias is not None
        self.bias = (
            ms.Parameter(to_ms(bias.detach().float().contiguous()), "bias", requires_grad=False)
            if self.has_bias
            else None
        )
        self.act = "none" if inputs is None else "dynamic" if inputs.dynamic else "static"
        self.act_symmetric = bool(inputs and inputs.symmetric)
        bits = inputs.bits if inputs else 8
        self.qmin, self.qmax = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
        if self.act == "static":
            if inputs.scale is None or inputs.zero is None:
                raise SlimportError(f"{name}: static input quantization without a calibrated scale")
            self.input_scale = ms.Parameter(
                to_ms(inputs.scale.float().reshape(1)), "input_scale", requires_grad=False
            )
            self.input_zero = ms.Parameter(
                to_ms(inputs.zero.float().reshape(1)), "input_zero", requires_grad=False
            )
        self.matmul = ops.MatMul(transpose_b=True)  # never w.T: measured 20x slower on CPU
        self.matmul_nt = ops.MatMul()

    def _hold_integers(self, weight: IntWeight, name: str) -> None:
        out_f, in_f = weight.q.shape
        if weight.bits not in (4, 8):
            raise SlimportError(
                f"{name}: {weight.bits}-bit weights have no integer layout in the MindSpore runtime",
                hint="4 and 8 bits are held as integers; load other schemes with dequantize='at_load'",
            )
        scale = weight.scale.float().reshape(out_f, -1) if weight.scale.numel() > 1 else None
        groups = 1 if scale is None else scale.shape[1]
        if in_f % groups:
            raise SlimportError(f"{name}: {in_f} input columns do not split into {groups} groups")
        gs = in_f // groups
        if weight.bits == 4 and gs % 2:
            raise SlimportError(f"{name}: 4-bit packing needs an even group size, not {gs}")
        self.groups, self.group_size = groups, gs
        full = lambda t: t.float().reshape(1, 1).expand(out_f, 1)  # noqa: E731 - per tensor
        scale = full(weight.scale) if scale is None else scale
        zero = weight.zero.float()
        zero = full(zero) if zero.numel() == 1 else zero.reshape(out_f, groups)
        zero = zero + (8.0 if weight.bits == 4 else 0.0)  # 4-bit: the nibbles are q + 8
        self.has_zero = bool(zero.any())
        # [groups, out, group_size] (groups > 1) or [out, in]: the right operand of one batched
        # (or plain) MatMul(transpose_b) per call; scale and zero [groups, 1, out] / [1, out]
        # broadcast over the rows of its output
        ints = weight.q.to(torch.int8).reshape(out_f, groups, gs).transpose(0, 1)
        if weight.bits == 4:  # low nibble: the group's first half of columns, high: the second
            u = (ints.to(torch.int16) + 8).to(torch.uint8)
            ints = u[..., : gs // 2] | (u[..., gs // 2 :] << 4)
        ints = ints[0] if groups == 1 else ints
        per_out = lambda t: t.T.reshape((groups, 1, out_f) if groups > 1 else (1, out_f))  # noqa: E731
        self.weight_q = ms.Parameter(to_ms(ints.contiguous()), "weight_q", requires_grad=False)
        self.weight_scale = ms.Parameter(
            to_ms(per_out(scale).contiguous()), "weight_scale", requires_grad=False
        )
        self.weight_zero = ms.Parameter(
            to_ms(per_out(zero).contiguous()), "weight_zero", requires_grad=False
        )
        self.bmm = ops.BatchMatMul(transpose_b=True)

    def _float_ints(self, after=None):
        """The held integers as float32; 4-bit: (low nibbles, high nibbles times 16), each
        [.., group_size / 2]. Only these few ops touch weight-sized data, in float: MindSpore's
        CPU uint8 BitwiseAnd / Sub run ~4x slower than a Cast (measured). `after`: a tensor the
        Cast must wait for (see _integer_matmul)."""
        q = self.weight_q if after is None else ops.depend(self.weight_q, after)
        q = q.astype(ms.float32)
        if self.bits == 8:
            return (q,)
        high16 = ops.floor(q * 0.0625) * 16.0  # exact: integers below 256
        return q - high16, high16

    def dequantized(self) -> ms.Tensor:
        """The float weight [out, in] (the reference: same float ops as torch's dequantize)."""
        if self.mode == "at_load":
            return self.weight
        parts = self._float_ints()
        q = parts[0] if self.bits == 8 else ops.concat((parts[0], parts[1] / 16), -1)
        if self.groups == 1:
            w = (q - self.weight_zero.reshape(-1, 1)) * self.weight_scale.reshape(-1, 1)
            return w
        # [G, out, gs] -> [out, G, gs]
        zero, scale = self.weight_zero.transpose(2, 0, 1), self.weight_scale.transpose(2, 0, 1)
        w = (q.transpose(1, 0, 2) - zero) * scale
        return w.reshape(self.out_channels, self.in_channels)

    def _integer_matmul(self, x):
        """x [M, in] @ dequantized(W).T without building the float weight: the integers (as
        float) go into the MatMul and scale / zero point act on its [M, out] output,
        y = sum_g s_g * (x_g . q_g) - sum_g s_g * z_g * sum(x_g): MindSpore's CPU broadcasts
        over the last axis (a scale per row / group) run 5-10x slower than the MatMul
        (measured). The Cast waits for x (ops.depend): graph mode otherwise runs every layer's
        weight-only ops first, all their float copies alive at once (the 8-12 GB of RSS that
        generate grew by, and most of its slowness)."""
        parts = self._float_ints(x)
        half = self.group_size // 2
        if self.groups == 1:
            if self.bits == 8:
                acc = self.matmul(x, parts[0])
            else:  # x_hi / 16 . (16 * high) is exactly x_hi . high (powers of two)
                acc = self.matmul(x[:, :half], parts[0]) + self.matmul(
                    x[:, half:] * 0.0625, parts[1]
                )
            y = acc * self.weight_scale
            if self.has_zero:
                y = y - x.sum(-1, keepdims=True) * (self.weight_scale * self.weight_zero)
            return y
        m = x.shape[0]
        xg = x.reshape(m, self.groups, self.group_size)
        xt = xg.transpose(1, 0, 2)  # [G, M, gs]
        if self.bits == 8:
            acc = self.bmm(xt, parts[0])
        else:
            acc = self.bmm(xt[:, :, :half], parts[0]) + self.bmm(xt[:, :, half:] * 0.0625, parts[1])
        y = (acc * self.weight_scale).sum(0)  # [G, M, out] -> [M, out]
        if self.has_zero:
            sz = (self.weight_scale * self.weight_zero).reshape(self.groups, self.out_channels)
            y = y - self.matmul_nt(xg.sum(-1), sz)
        return y

    def fake_quantize_input(self, x):
        """x on the int8 grid and back, as torch's QuantLinear does (exact same float ops)."""
        if self.act == "static":
            s, z = self.input_scale, self.input_zero
        else:  # per token, from this call's ranges
            lo = ops.clamp(x.min(axis=-1, keepdims=True), max=0.0)
            hi = ops.clamp(x.max(axis=-1, keepdims=True), min=0.0)
            if self.act_symmetric:
                s = ops.maximum(-lo, hi) / ((self.qmax - self.qmin) / 2)
            else:
                s = (hi - lo) / (self.qmax - self.qmin)
            s = ops.select(s == 0, ops.full_like(s, _EPS32), s)
            z = (
                ops.zeros_like(s)
                if self.act_symmetric
                else ops.clamp(ops.round(self.qmin - lo / s), self.qmin, self.qmax)
            )
        q = ops.clamp(ops.round(x / s + z), self.qmin, self.qmax)
        return (q - z) * s

    def construct(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.act != "none":
            x = self.fake_quantize_input(x)
        if self.mode == "at_load":
            y = self.matmul(x, self.weight.astype(x.dtype))
        else:
            y = self._integer_matmul(x.astype(ms.float32)).astype(x.dtype)
        if self.has_bias:
            y = y + self.bias.astype(x.dtype)
        return y.reshape(shape[:-1] + (self.out_channels,))

    def resident_bytes(self) -> int:
        return sum(p.nbytes for p in self.get_parameters())

    def extend_repr(self) -> str:
        g = (
            ""
            if self.mode == "at_load"
            else f"g{self.group_size}"
            if self.groups > 1
            else "per-channel"
        )
        act = "" if self.act == "none" else f", a8 {self.act}"
        return f"{self.in_channels}->{self.out_channels}, w{self.bits} {g}{act}, dequantize={self.mode}"


class QuantEmbedding(nn.Cell):
    """`nn.Embedding` with its table held as int8, one scale per row (symmetric round to
    nearest: the torch runtime's `embeddings="int8"`); parameters `weight_q` [vocab, dim] and
    `weight_scale` [vocab, 1]. A lookup dequantizes only the rows it reads; `logits(h)` is the
    tied LM head on the same integers, h [M, dim] @ table.T scaled per vocabulary row."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size, self.embedding_size = table.shape
        q, scale, _ = P.rtn(table.float(), INT8_ROWS)  # the torch runtime's integers
        q, scale = q.to(torch.int8), scale.float().reshape(-1, 1)
        self.weight_q = ms.Parameter(to_ms(q.contiguous()), "weight_q", requires_grad=False)
        self.weight_scale = ms.Parameter(to_ms(scale.contiguous()), "weight_scale", requires_grad=False)  # fmt: skip
        self.matmul = ops.MatMul(transpose_b=True)

    def dequantized(self) -> ms.Tensor:
        return self.weight_q.astype(ms.float32) * self.weight_scale

    def construct(self, ids):
        rows = ops.gather(self.weight_q, ids, 0).astype(ms.float32)
        return rows * ops.gather(self.weight_scale, ids, 0)

    def logits(self, h):
        q = ops.depend(self.weight_q, h).astype(ms.float32)  # after h: see QuantDense
        return self.matmul(h, q) * self.weight_scale.reshape(1, -1)


def hold_integer_embedding(root: nn.Cell, how: str) -> str:
    """Replace the token embedding of `root` (the nn.Embedding with `vocab_size` rows) by a
    QuantEmbedding of its loaded table; a tied head (`root.head_on_integers`) follows it."""
    vocab = int(root.config["vocab_size"])
    found = [(n, c) for n, c in root.cells_and_names() if isinstance(c, nn.Embedding) and c.vocab_size == vocab]  # fmt: skip
    if not found:
        raise SlimportError(f"embeddings={how!r}: {type(root).__name__} has no token embedding")
    path, old = found[0]
    new = QuantEmbedding(torch.from_numpy(old.embedding_table.asnumpy()))
    _put_cell(root, path, new)
    if hasattr(root, "head_on_integers") and getattr(root, "tied", False):
        root.head_on_integers = True
    head = ", the tied LM head computes on them" if getattr(root, "head_on_integers", False) else ""
    return f"{path} holds int8 rows with a scale each{head}"


def _put_cell(root: nn.Cell, path: str, new: nn.Cell) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else ():
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    short = {id(p): p.name for p in new.get_parameters()}
    setattr(parent, leaf, new)
    for p in new.get_parameters():  # setattr prefixes the leaf only: name the full path
        p.name = f"{path}.{short[id(p)]}"


def replace_dense(root: nn.Cell, path: str, new: nn.Cell) -> None:
    """Put `new` at the dotted cell path `path` of `root` (parameter names follow the path)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else ():
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    old = getattr(parent, leaf, None)
    if not isinstance(old, nn.Dense):
        raise SlimportError(f"{path}: not a Dense cell of {type(root).__name__}")
    if (old.in_channels, old.out_channels) != (new.in_channels, new.out_channels):
        raise SlimportError(
            f"{path}: quantized weight is {new.out_channels}x{new.in_channels}, "
            f"the model's Dense is {old.out_channels}x{old.in_channels}"
        )
    _put_cell(root, path, new)


def hold_integer_linears(
    cell: nn.Cell, model, planned: list, dequantize: str
) -> tuple[list, set[str], list[str]]:
    """Replace the Dense cells of `cell` whose checkpoint Linear is quantized by QuantDense
    cells holding its integers (`model.source.quantized`, io.compressed.IntLinear), before the
    float parameters load. Returns the plan without those weights, the QuantDense parameter
    names (set here, not by the float load) and notes for the load report.

    A Linear whose MindSpore weight is not its checkpoint weight renamed (a Tie, a transpose)
    cannot take the integers as they are: weight-only, it loads the dequantized float weight and
    the notes say so; with quantized inputs that would drop the input quantization, so it is an
    error."""
    quantized = model.source.quantized
    hub_of = {
        p.sources[0]: h
        for h, p in model.hub.items()
        if len(p.sources) == 1 and not p.ops and p.sources[0].endswith(".weight")
    }
    by_source = {t.sources[0]: t for t in planned if len(t.sources) == 1 and not t.ops}
    held: set[str] = set()
    replaced: set[str] = set()
    kept_float: list[str] = []
    schemes: set[str] = set()
    for name, lin in quantized.items():
        target = by_source.get(hub_of.get(f"{name}.weight"))
        if target is None or not target.name.endswith(".weight"):
            if lin.inputs is not None:
                raise SlimportError(
                    f"{model.source.path}: {name} is quantized with int8 inputs, but its "
                    "MindSpore weight is not the checkpoint weight as it is",
                    hint="quantize weight-only, or protect this Linear (--protect)",
                )
            kept_float.append(name)
            continue
        path = target.name[: -len(".weight")]
        q, scale, zero = lin.read()
        inputs = None
        if lin.inputs is not None:
            s_, z_ = lin.input_qparams() if lin.input_qparams else (None, None)
            inputs = IntInput(lin.inputs.bits, lin.inputs.symmetric, lin.inputs.dynamic, s_, z_)
        has_bias = any(t.name == f"{path}.bias" for t in planned)
        new = QuantDense(
            IntWeight(q, scale, zero, lin.weights.bits),
            torch.zeros(q.shape[0]) if has_bias else None,
            dequantize,
            inputs,
            name=f"{model.source.path}: {name}",
        )
        replace_dense(cell, path, new)
        held |= {p.name for p in new.get_parameters() if not p.name.endswith(".bias")}
        replaced.add(target.name)
        schemes.add(new.extend_repr().split(", ", 1)[1])
    notes = [f"{len(replaced)} Linear layers hold their integers ({'; '.join(sorted(schemes))})"]
    if kept_float:
        notes.append(
            "dequantized to float (their MindSpore weight is not the checkpoint's as it is): "
            + ", ".join(kept_float)
        )
    return [t for t in planned if t.name not in replaced], held, notes
