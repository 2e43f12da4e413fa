"""W8A8 Linears as ONNX integer GEMMs: the folder's int8 weights unchanged in `MatMulInteger`, the
inputs quantized inside the graph exactly as compressed-tensors (and `load_quantized`) computes
them, per token at run time (dynamic) or with the calibrated per-tensor scale and zero point
(static), integers in [-128, 127]:

  scale = (max(x_max, 0) - min(x_min, 0)) / 255       symmetric: max(-x_min, x_max) / 127.5; 0 -> eps
  zero  = clamp(round(-128 - min(x_min, 0) / scale))  symmetric: 0
  q     = clamp(round(x / scale + zero), -128, 127)

ONNX Runtime's DynamicQuantizeLinear and DynamicQuantizeMatMul quantize the whole tensor at once
(uint8), which is not what a per-token folder computes, so the quantization is spelled out with
elementwise ops. The product stays in int32 until the two last multiplies, in the order of the
torch runtime's int_mm path (zero points folded in as int32 corrections):

  acc = MatMulInteger(q, W^T) - zero * colsum(W)  [- rowsum(q) * zw + K * zero * zw]

(q is fed as q + 128 in uint8 with MatMulInteger's zero point 128: the same integer sums, and
ONNX Runtime's u8s8 GEMM is about 20x faster on CPU than its s8s8 one.)
  y   = float(acc) * scale * s_w                  [+ bias]

Initializers per Linear P: P.weight_int8 int8 [in, out] (our integers, transposed to
MatMulInteger's [K, N]) and P.weight_scale float [out]; P.weight_colsum int32 [out] for
asymmetric inputs, P.weight_zero_point int32 [out] for asymmetric weights, P.input_scale and
P.input_zero_point float [1] for static inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from slimport.runtime.onnx.graph import Graph

UINT8, INT32, FLOAT = 2, 6, 1  # onnx.TensorProto element types
EPS = float(np.finfo(np.float32).eps)  # what qparams puts in place of a zero scale


def weight_arrays(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool
) -> dict:
    """The initializers of one W8A8 Linear from its integers [N, K] and per-row (or per-tensor)
    scales and zero points."""
    n = q.shape[0]
    qi = q.to(torch.int32)
    out = {
        "weight_int8": np.ascontiguousarray(q.to(torch.int8).numpy().T),
        "weight_scale": np.ascontiguousarray(scale.float().reshape(-1).expand(n).numpy()),
        "weight_colsum": qi.sum(1, dtype=torch.int32).numpy(),
    }
    if not symmetric:
        out["weight_zero_point"] = zero.to(torch.int32).reshape(-1).expand(n).numpy().copy()
    return out


def _quantize_input(g: Graph, x: str, symmetric: bool, static: tuple[str, str] | None):
    """(q + 128 uint8 [M, K], scale, zero point or None) of x [M, K], as the folder computes."""
    f = lambda v: g.const(v, np.float32)  # noqa: E731
    if static is not None:
        scale, zero = static
    else:
        lo = g.op("Min", g.op("ReduceMin", x, axes=[-1], keepdims=1), f(0.0))
        hi = g.op("Max", g.op("ReduceMax", x, axes=[-1], keepdims=1), f(0.0))
        if symmetric:
            scale = g.op("Div", g.op("Max", g.op("Neg", lo), hi), f(127.5))
        else:
            scale = g.op("Div", g.op("Sub", hi, lo), f(255.0))
        scale = g.op("Where", g.op("Equal", scale, f(0.0)), f(EPS), scale)
        zero = None
        if not symmetric:
            zero = g.op("Round", g.op("Sub", f(-128.0), g.op("Div", lo, scale)))
            zero = g.op("Clip", zero, f(-128.0), f(127.0))
    y = g.op("Div", x, scale)
    y = g.op("Round", y if zero is None else g.op("Add", y, zero))
    # held as q + 128 in uint8: ONNX Runtime's u8s8 integer GEMM is ~20x its s8s8 path on CPU
    q = g.op("Cast", g.op("Add", g.op("Clip", y, f(-128.0), f(127.0)), f(128.0)), to=UINT8)
    return q, scale, zero


def emit(
    g: Graph,
    x: str,
    prefix: str,
    arrays: dict,
    symmetric_inputs: bool,
    static: dict | None,
    bias: str | None,
) -> str:
    """x [tokens, K] -> [tokens, N] through the int8 weights and int8 inputs of Linear `prefix`."""
    names = {k: f"{prefix}.{k}" for k in arrays}  # added as initializers where used
    for key in ("weight_int8", "weight_scale"):
        g.tensor(names[key], arrays[key])
    k = int(arrays["weight_int8"].shape[0])
    qparams = None
    if static is not None:
        qparams = (g.tensor(f"{prefix}.input_scale", static["scale"]),
                   None if symmetric_inputs else g.tensor(f"{prefix}.input_zero_point", static["zero"]))  # fmt: skip
    q, scale, zero = _quantize_input(g, x, symmetric_inputs, qparams)
    acc = g.op("MatMulInteger", q, names["weight_int8"], g.const(128, np.uint8))  # sum q * w
    zi = None if zero is None else g.op("Cast", zero, to=INT32)
    if zi is not None:
        colsum = g.tensor(names["weight_colsum"], arrays["weight_colsum"])
        acc = g.op("Sub", acc, g.op("Mul", zi, colsum))
    if "weight_zero_point" in names:
        zw = g.tensor(names["weight_zero_point"], arrays["weight_zero_point"])
        rowsum = g.op("ReduceSum", g.op("Cast", q, to=INT32), g.const([-1]), keepdims=1)
        rowsum = g.op("Sub", rowsum, g.const(128 * k, np.int32))  # of the signed integers
        acc = g.op("Sub", acc, g.op("Mul", rowsum, zw))
        if zi is not None:
            acc = g.op("Add", acc, g.op("Mul", g.op("Mul", zi, g.const(k, np.int32)), zw))
    y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to=FLOAT), scale), names["weight_scale"])
    return y if bias is None else g.op("Add", y, bias)
