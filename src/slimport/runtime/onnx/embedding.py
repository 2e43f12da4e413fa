"""The token embedding as `com.microsoft::GatherBlockQuantized` (ONNX Runtime has a CPU kernel):
int8 per row or 4-bit asymmetric groups of 32, rounded to nearest exactly as
`load_quantized(..., embeddings=...)` rounds them, so both runtimes look up the same integers.

The kernel's uint8 layout is MatMulNBits': data [V, K] (8 bits) or [V, K/2] (4 bits, LSB first),
scales float [V, n_blocks], zero points uint8 packed the same way (default 2^(bits-1), i.e.
signed 0); gather_axis 0 and quantize_axis 1 (all it takes for uint8 data), block_size a power of
two >= 16. One scale per row becomes equal scales over the widest such block that divides K. A
tied head computes on the same integers: MatMulNBits reads the one initializer reshaped to its
[N, n_blocks, block*bits/8].
"""

from __future__ import annotations

import numpy as np
import torch

from slimport.compress.quant import primitives as P
from slimport.errors import SlimportError
from slimport.runtime.onnx.graph import MS_DOMAIN, Graph
from slimport.runtime.onnx.quantized import _pack
from slimport.runtime.torch.quantized import EMBEDDINGS


class QuantizedEmbedding:
    """One token embedding [V, K], quantized once; `gather` and `head` emit its two uses."""

    def __init__(self, g: Graph, name: str, weight: np.ndarray, how: str, accuracy_level: int):
        if how not in EMBEDDINGS:
            raise SlimportError(f"embeddings {how!r} is not supported", hint="int8 or int4")
        args = EMBEDDINGS[how]
        v, k = weight.shape
        if args.granularity == "group":
            block = args.group_size
        else:
            block = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
        if block is None or k % block:
            raise SlimportError(
                f"{name}: {k} features fit no {how} block of 16..128 for GatherBlockQuantized",
                hint="export without embeddings quantization",
            )
        q, scale, zero = P.rtn(torch.from_numpy(weight).float(), args)
        n_blocks = k // block
        offset = 1 << (args.bits - 1)
        scale = scale.reshape(v, -1).expand(v, n_blocks)
        self.bits, self.block, self.k, self.accuracy_level = args.bits, block, k, accuracy_level
        self.data = g.tensor(f"{name}_quantized", _pack((q + offset).numpy().astype(np.uint8), args.bits))  # fmt: skip
        self.scale = g.tensor(f"{name}_scale", np.ascontiguousarray(scale.numpy(), np.float32))
        self.zero = None
        if not args.symmetric:
            z = (zero.reshape(v, -1).expand(v, n_blocks) + offset).numpy().astype(np.uint8)
            self.zero = g.tensor(f"{name}_zero_point", _pack(z, args.bits))
        self.shape = (v, n_blocks, block * args.bits // 8)

    def gather(self, g: Graph, ids: str) -> str:
        """The rows `ids` (any shape) as floats: [*ids.shape, K]."""
        return g.op("GatherBlockQuantized", self.data, ids, self.scale, self.zero,
                    domain=MS_DOMAIN, bits=self.bits, block_size=self.block,
                    gather_axis=0, quantize_axis=1)  # fmt: skip

    def head(self, g: Graph, x: str) -> str:
        """x [tokens, K] @ W^T through the same integers (a tied output head)."""
        b = g.reshape(self.data, list(self.shape))
        return g.op("MatMulNBits", x, b, self.scale, self.zero, domain=MS_DOMAIN,
                    K=self.k, N=self.shape[0], bits=self.bits, block_size=self.block,
                    accuracy_level=self.accuracy_level)  # fmt: skip
