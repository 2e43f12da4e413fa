"""A compressed-tensors folder's integers as `com.microsoft::MatMulNBits`, exactly (no re-rounding).

compressed-tensors holds signed integers q in [-2^(b-1), 2^(b-1)) with signed zero points z and
computes (q - z) * s. MatMulNBits holds unsigned ones: adding 2^(b-1) to both q and z leaves
q - z, hence every dequantized weight, unchanged. Its layout, per Linear with K inputs, N outputs:

  B            uint8 [N, n_blocks, block*bits/8]  K-consecutive values, LSB first
  scales       float [N, n_blocks]
  zero_points  uint8 [N, ceil(n_blocks*bits/8)]   packed the same way; omitted when symmetric
               (MatMulNBits' default zero point is 2^(b-1), i.e. signed 0)

block_size is our group size. Per-channel and per-tensor scales become equal scales over
128-wide blocks (K padded with the zero point, which dequantizes to 0). A folder whose inputs are
quantized too (W8A8) computes with MatMulInteger instead (w8a8.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.io import safetensors
from slimport.io.compressed import PACKED, Scheme, read_config, read_linear, schemes_from
from slimport.runtime.onnx import w8a8
from slimport.runtime.onnx.graph import MS_DOMAIN, Graph

BITS = (4, 8)  # what MatMulNBits runs on CPU (its 2-bit path is not what our recipes make)
CHANNEL_BLOCK = 128


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits, packed along the last axis, LSB first."""
    if bits == 8:
        return u
    per = 8 // bits
    pad = (-u.shape[-1]) % per
    if pad:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], pad), np.uint8)], axis=-1)
    u = u.reshape(*u.shape[:-1], -1, per)
    out = np.zeros(u.shape[:-1], np.uint8)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out


def _check(folder: Path, name: str, s: Scheme) -> Scheme:
    """`s` when ONNX Runtime computes Linear `name` in it; else an error naming both."""
    w, a = s.weights, s.inputs
    what = f"W{w.bits}" + (f"A{a.bits} {'dynamic' if a.dynamic else 'static'}" if a else "")
    where = f"{folder}: {name} ({s})"
    if a is not None and (w.bits != 8 or w.granularity == "group"):
        raise SlimportError(
            f"{where}: {what} {w.granularity} weights with quantized activations: the ONNX "
            "integer GEMM (MatMulInteger) takes 8-bit weights with one scale per row",
            hint="quantize W8A8 per channel (--bits 8 --activations dynamic|static), "
            "or weight-only for MatMulNBits",
        )
    if w.bits not in BITS:
        raise SlimportError(
            f"{where}: {what} weights: ONNX Runtime's MatMulNBits runs "
            + " or ".join(f"{b}-bit" for b in BITS)
            + " weights on CPU",
            hint="quantize with --bits 4 or --bits 8 to export to ONNX",
        )
    if w.granularity == "group" and (w.group_size < 16 or w.group_size & (w.group_size - 1)):
        raise SlimportError(
            f"{where}: group size {w.group_size}: MatMulNBits blocks are powers of two >= 16",
            hint="quantize with --group-size 32, 64 or 128",
        )
    return s


class QuantizedLinears:
    """The quantized Linears of one compressed-tensors folder (its config.json + safetensors),
    each in its own config group's scheme (a mixed-precision folder's W4 and W8 Linears)."""

    def __init__(self, folder: Path, accuracy_level: int = 4):
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise SlimportError(
                f"accuracy_level={accuracy_level!r}: MatMulNBits takes 0 (unset), 1 (fp32), "
                "2 (fp16), 3 (bf16) or 4 (int8 activations)"
            )
        self.folder, self.accuracy_level = folder, accuracy_level
        _, schemes = schemes_from(
            folder / "config.json", read_config(folder)["quantization_config"]
        )
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        self.ckpt = safetensors.read(index if index.is_file() else single)
        suffix = ".weight_scale"
        names = sorted(n[: -len(suffix)] for n in self.ckpt.infos if n.endswith(suffix))
        try:  # each Linear its own config group's scheme, checked before any node is made
            self.schemes = {n: _check(folder, n, schemes.of(n)) for n in names}
        except SlimportError:
            self.ckpt.close()
            raise
        self.names = set(names)
        self.scheme = "; ".join(str(s) for s in dict.fromkeys(self.schemes.values()))

    def __contains__(self, prefix: str) -> bool:
        return prefix in self.names

    def close(self) -> None:
        self.ckpt.close()

    def _take(self, name: str, what: str) -> torch.Tensor:
        if name not in self.ckpt.infos:
            raise SlimportError(f"{self.ckpt.path}: tensor {name!r} is missing ({what})")
        return self.ckpt.load(name)

    def _shape(self, prefix: str) -> tuple[int, int]:
        if self.schemes[prefix].format == PACKED:
            return tuple(self._take(f"{prefix}.weight_shape", "weight shape").tolist())
        return tuple(self.ckpt.infos[f"{prefix}.weight"].shape)

    def arrays(self, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
        """MatMulNBits inputs (B, scales, zero points or None) and attributes of one Linear."""
        s = self.schemes[prefix]
        w = s.weights
        n, k = self._shape(prefix)
        q, scale, zero = read_linear(self.ckpt, prefix, (n, k), w, s.format, self._take)
        block = (
            w.group_size
            if w.granularity == "group"
            else min(CHANNEL_BLOCK, 1 << (k - 1).bit_length())
        )
        n_blocks = -(-k // block)
        scale = scale.float().reshape(-1, scale.shape[-1]).expand(n, -1)  # tensor: [1] -> [N, 1]
        zero = zero.to(torch.int32).reshape(-1, zero.shape[-1]).expand(n, -1)
        if w.granularity != "group":  # one scale per row, repeated over the blocks
            scale, zero = scale[:, :1].expand(n, n_blocks), zero[:, :1].expand(n, n_blocks)
        offset = 1 << (w.bits - 1)
        u = (q.to(torch.int32) + offset).numpy().astype(np.uint8)
        if n_blocks * block != k:  # pad with each row's zero point: dequantizes to exactly 0
            pad = np.repeat(zero[:, -1:].numpy() + offset, n_blocks * block - k, axis=1)
            u = np.concatenate([u, pad.astype(np.uint8)], axis=1)
        out = {
            "weight_packed": _pack(u.reshape(n, n_blocks, block), w.bits),
            "weight_scale": np.ascontiguousarray(scale.numpy(), np.float32),
            "weight_zero_point": None,
        }
        if not w.symmetric:
            out["weight_zero_point"] = _pack((zero.numpy() + offset).astype(np.uint8), w.bits)
        attrs = {"K": k, "N": n, "bits": w.bits, "block_size": block}
        return out, attrs

    def emit(self, g: Graph, x: str, prefix: str, bias: str | None) -> str:
        """x [tokens, K] -> [tokens, N] through the integers of Linear `prefix`."""
        if self.schemes[prefix].inputs is not None:
            return self._emit_w8a8(g, x, prefix, bias)
        arrays, attrs = self.arrays(prefix)
        names = [None if a is None else g.tensor(f"{prefix}.{key}", a) for key, a in arrays.items()]
        y = g.op(
            "MatMulNBits", x, *names, domain=MS_DOMAIN, accuracy_level=self.accuracy_level, **attrs
        )
        return y if bias is None else g.op("Add", y, bias)

    def packable(self, prefixes: list[str]) -> bool:
        """Whether Linears of one input can run as one MatMulNBits: all weight-only integers of
        one scheme (bits, group size, symmetry) over the same K."""
        if not all(p in self.names for p in prefixes):
            return False
        schemes = [self.schemes[p] for p in prefixes]
        if any(s.inputs is not None for s in schemes):
            return False
        ks = {self._shape(p)[1] for p in prefixes}
        return len(ks) == 1 and len({(s.weights, s.format) for s in schemes}) == 1

    def emit_packed(self, g: Graph, x: str, prefixes: list[str], biases: list) -> tuple[str, list]:
        """x [tokens, K] -> ([tokens, sum N], each Linear's N): ONE MatMulNBits over their rows
        stacked (q/k/v, gate/up): the activation is quantized once and one kernel runs instead of
        several. The stacked B, scales and zero points are Concat nodes over each Linear's own
        initializers (hub-named, as `emit` writes them), which ONNX Runtime folds at load."""
        parts = [self.arrays(p) for p in prefixes]
        ns = [attrs["N"] for _, attrs in parts]
        stacked = []
        for key in ("weight_packed", "weight_scale", "weight_zero_point"):
            if parts[0][0][key] is None:
                stacked.append(None)
                continue
            names = [
                g.tensor(f"{p}.{key}", a[key]) for p, (a, _) in zip(prefixes, parts, strict=True)
            ]
            stacked.append(g.op("Concat", *names, axis=0))
        attrs = {**parts[0][1], "N": sum(ns)}
        y = g.op("MatMulNBits", x, *stacked, domain=MS_DOMAIN,
                 accuracy_level=self.accuracy_level, **attrs)  # fmt: skip
        if any(b is not None for b in biases):
            zeros = [g.const(np.zeros(n), np.float32) for n in ns]
            y = g.op(
                "Add",
                y,
                g.op("Concat", *[b or z for b, z in zip(biases, zeros, strict=True)], axis=0),
            )
        return y, ns

    def _emit_w8a8(self, g: Graph, x: str, prefix: str, bias: str | None) -> str:
        s = self.schemes[prefix]
        q, scale, zero = read_linear(
            self.ckpt, prefix, self._shape(prefix), s.weights, s.format, self._take
        )
        arrays = w8a8.weight_arrays(q, scale, zero, s.weights.symmetric)
        a, static = s.inputs, None
        if not a.dynamic:
            s = self._take(f"{prefix}.input_scale", "static input scale").float().reshape(1)
            z = (torch.zeros(1) if a.symmetric
                 else self._take(f"{prefix}.input_zero_point", "input zero point").float().reshape(1))  # fmt: skip
            static = {"scale": s.numpy(), "zero": z.numpy()}
        return w8a8.emit(g, x, prefix, arrays, a.symmetric, static, bias)
