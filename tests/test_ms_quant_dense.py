"""QuantDense: integer-held weights in MindSpore compute what the dequantized weights compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")

from slimport.compress.quant import primitives as P  # noqa: E402
from slimport.compress.quant.config import QuantArgs  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402
from slimport.runtime.mindspore.quantized import IntWeight, QuantDense  # noqa: E402

SCHEMES = [
    QuantArgs(bits=8, granularity="channel", symmetric=True),
    QuantArgs(bits=8, granularity="channel", symmetric=False),
    QuantArgs(bits=8, granularity="group", group_size=16, symmetric=False),
    QuantArgs(bits=4, granularity="group", group_size=16, symmetric=True),
    QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False),
    QuantArgs(bits=4, granularity="channel", symmetric=False),
    QuantArgs(bits=8, granularity="tensor", symmetric=True),
]


def assert_fp32_close(out: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding: per_call multiplies the integers, then scales and subtracts
    the zero point on the output (measured <= 5e-7 of the largest output)."""
    assert np.abs(out - expected).max() <= 2e-6 * np.abs(expected).max()


def _layer(args: QuantArgs, out_f: int = 24, in_f: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    q, scale, zero = P.rtn(w, args)
    ref = P.dequantize_tensor(q, args, scale, zero)
    return IntWeight(q.to(torch.int8), scale, zero, args.bits), ref, torch.randn(out_f, generator=g)


@pytest.mark.parametrize(
    "args", SCHEMES, ids=lambda a: f"w{a.bits}-{a.granularity}-{'sym' if a.symmetric else 'asym'}"
)
@pytest.mark.parametrize("dequantize", ["per_call", "at_load"])
def test_matches_the_dequantized_reference(args, dequantize, mode):
    weight, ref, bias = _layer(args)
    cell = QuantDense(weight, bias, dequantize=dequantize)
    assert np.array_equal(cell.dequantized().asnumpy(), ref.numpy())  # bit-identical weights
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    out = cell(ms.Tensor(x.numpy())).asnumpy()
    expected = torch.nn.functional.linear(x, ref, bias).numpy()
    assert out.shape == (2, 5, 24)
    assert_fp32_close(out, expected)


def test_per_call_holds_only_integers():
    weight, _, _ = _layer(QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False))
    cell = QuantDense(weight, None)
    dtypes = {p.name: p.dtype for p in cell.get_parameters()}
    # two 4-bit integers a byte, laid out [groups, out, group_size / 2]
    assert dtypes["weight_q"] == ms.uint8 and tuple(cell.weight_q.shape) == (2, 24, 16)
    assert not any(p.dtype == ms.float32 and p.size == 24 * 64 for p in cell.get_parameters())
    # 0.5 B per weight + two float32 per group of 32: ~0.125x of fp32's 4 B
    assert cell.resident_bytes() <= 0.2 * 24 * 64 * 4


def test_three_bits_compute_only_as_float_after_load():
    weight, ref, _ = _layer(QuantArgs(bits=3, granularity="channel", symmetric=True))
    with pytest.raises(SlimportError, match="3-bit") as e:
        QuantDense(weight)
    assert "at_load" in e.value.hint
    assert np.array_equal(
        QuantDense(weight, dequantize="at_load").dequantized().asnumpy(), ref.numpy()
    )


def test_refuses_what_it_cannot_hold():
    weight, _, _ = _layer(SCHEMES[0])
    with pytest.raises(SlimportError, match="dequantize"):
        QuantDense(weight, dequantize="never")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_int8_inputs_match_torch_fake_quantization(dynamic, symmetric, mode):
    from slimport.runtime.mindspore.quantized import IntInput

    args = SCHEMES[1]
    weight, ref, bias = _layer(args)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2)) * 3
    a = QuantArgs(8, symmetric, "token" if dynamic else "tensor", None, dynamic=dynamic)
    if dynamic:
        inputs, xq = IntInput(8, symmetric, True), P.dynamic_fake_quantize(x, a)
    else:
        scale, zero = P.qparams(x.min().reshape(1), x.max().reshape(1), 8, symmetric)
        inputs = IntInput(8, symmetric, False, scale, zero)
        xq = P.dequantize(P.quantize(x, scale, zero, 8), scale, zero)
    cell = QuantDense(weight, bias, inputs=inputs)
    out = cell(ms.Tensor(x.numpy())).asnumpy()
    expected = torch.nn.functional.linear(xq, ref, bias).numpy()
    assert_fp32_close(out, expected)  # ops.round rounds half to even, as torch
    assert np.abs(out - torch.nn.functional.linear(x, ref, bias).numpy()).max() > 1e-3  # quantized
