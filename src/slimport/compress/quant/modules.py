"""`QuantLinear`: a Linear whose weight is held as integers + scales (and optionally whose input is
quantized), computing exactly what a loader of the saved integers computes."""

from __future__ import annotations

import torch
from torch import nn

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs


class QuantLinear(nn.Module):
    """Buffers are named as compressed-tensors names them in a checkpoint:
    `weight_scale`, `weight_zero_point` ([out, groups], [out, 1] or [1]), `input_scale`,
    `input_zero_point` ([1], static activations only). `qweight` holds the integers;
    `weight` is their dequantized value, used for compute."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None,
        weight_args: QuantArgs,
        input_args: QuantArgs | None = None,
    ) -> None:
        super().__init__()
        self.weight_args, self.input_args = weight_args, input_args
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", zero.to(torch.int8))
        self.register_buffer(
            "weight", P.dequantize_tensor(q.float(), weight_args, scale.float(), zero.float())
        )
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("input_scale", None)  # static activations: set by calibration
        self.register_buffer("input_zero_point", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, q, scale, zero, weight_args, input_args=None
    ) -> QuantLinear:
        return cls(q, scale, zero, linear.bias, weight_args, input_args)

    def set_input_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.register_buffer("input_scale", scale.float().reshape(1))
        self.register_buffer("input_zero_point", zero.to(torch.int8).reshape(1))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.input_args
        if a is None:
            return x
        if a.dynamic:
            return P.dynamic_fake_quantize(x, a)
        if self.input_scale is None:  # still calibrating: observers watch the float input
            return x
        s, z = self.input_scale.to(x.dtype), self.input_zero_point.to(x.dtype)
        return P.dequantize(P.quantize(x, s, z, a.bits), s, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        w, a = self.weight_args, self.input_args
        g = f"g{w.group_size}" if w.granularity == "group" else w.granularity
        act = "" if a is None else f", a{a.bits} {'dynamic' if a.dynamic else 'static'}"
        return f"{self.in_features}->{self.out_features}, w{w.bits} {g} {'sym' if w.symmetric else 'asym'}{act}"
