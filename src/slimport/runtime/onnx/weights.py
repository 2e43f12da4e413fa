"""Hub tensors as graph initializers, each used exactly once (strict coverage, as in convert/)."""

from __future__ import annotations

import numpy as np

from slimport.errors import SlimportError, name_list
from slimport.runtime.onnx.embedding import QuantizedEmbedding
from slimport.runtime.onnx.graph import Graph


class Weights:
    """Reads hub tensors on demand; Linears that the folder holds as integers go to `quantized`
    (a `QuantizedLinears`), every other one is a float `Gemm`."""

    def __init__(self, hub: dict, where: str, quantized=None, embeddings: str | None = None,
                 accuracy_level: int = 4):  # fmt: skip
        self.hub, self.where, self.quantized = hub, where, quantized
        self.embeddings, self.accuracy_level = embeddings, accuracy_level  # see embedding.py
        self.used: set[str] = set()
        self._quantized_embeddings: dict = {}

    def lookup(self, g: Graph, name: str, ids: str) -> str:
        """Rows `ids` of the token embedding `name`: a Gather, or GatherBlockQuantized when the
        export quantizes the embedding."""
        if self.embeddings is None:
            return g.op("Gather", self.value(g, name), ids)
        emb = QuantizedEmbedding(g, name, self.array(name), self.embeddings, self.accuracy_level)
        self._quantized_embeddings[name] = emb
        return emb.gather(g, ids)

    def tied_head(self, g: Graph, x: str, name: str) -> str:
        """x @ E^T for an output head tied to embedding `name` (on its integers if quantized)."""
        if name in self._quantized_embeddings:
            return self._quantized_embeddings[name].head(g, x)
        return g.linear(x, self.value(g, name))

    def has(self, name: str) -> bool:
        return name in self.hub

    def array(self, name: str) -> np.ndarray:
        if name not in self.hub:
            raise SlimportError(f"{self.where}: tensor {name!r} is missing for the ONNX graph")
        self.used.add(name)
        return self.hub[name].compute().detach().float().numpy()

    def value(self, g: Graph, name: str) -> str:
        """The initializer `name` (added on first use) as an fp32 graph value."""
        if name in g.initializers:
            return g.weight(name, None)  # cached: the array is not read again
        array = self.array(name)
        if g.weight_dtype == np.float16 and np.abs(array).max(initial=0) > np.finfo(np.float16).max:
            raise SlimportError(
                f"{self.where}: tensor {name!r} holds values beyond float16's range",
                hint="export with dtype float32",
            )
        return g.weight(name, array)

    def optional(self, g: Graph, name: str) -> str | None:
        return self.value(g, name) if self.has(name) else None

    def linear(self, g: Graph, x: str, prefix: str, trans_b: int = 1) -> str:
        """`prefix` Linear (hub `prefix.weight` [out, in], optional `prefix.bias`) applied to x."""
        bias = self.optional(g, prefix + ".bias")
        if self.quantized is not None and prefix in self.quantized:
            self.used.add(prefix + ".weight")  # the hub's dequantized view of these integers
            return self.quantized.emit(g, x, prefix, bias)
        return g.linear(x, self.value(g, prefix + ".weight"), bias, trans_b)

    def linears(
        self, g: Graph, x: str, prefixes: list[str], split: bool = False
    ) -> list[str] | str:
        """Several Linears of the same input x: integer ones of one scheme as one packed
        MatMulNBits (`QuantizedLinears.emit_packed`), its output with the features in `prefixes`
        order, or Split into each Linear's (`split`); else a list, one by one."""
        q = self.quantized
        if q is None or len(prefixes) < 2 or not q.packable(prefixes):
            return [self.linear(g, x, p) for p in prefixes]
        biases = [self.optional(g, p + ".bias") for p in prefixes]
        self.used.update(p + ".weight" for p in prefixes)
        y, sizes = q.emit_packed(g, x, prefixes, biases)
        return list(g.op("Split", y, g.const(sizes), n_out=len(sizes), axis=-1)) if split else y

    def layer_norm(self, g: Graph, prefix: str, x: str, eps: float) -> str:
        return g.layer_norm(
            x, self.value(g, prefix + ".weight"), self.optional(g, prefix + ".bias"), eps
        )

    def check_all_used(self) -> None:
        unused = set(self.hub) - self.used
        if unused:
            raise SlimportError(
                f"{self.where}: the ONNX graph has no place for tensor(s) {name_list(unused)}",
                hint="the config describes a different model than the weights (or a variant "
                "slimport's ONNX builder does not cover)",
            )
