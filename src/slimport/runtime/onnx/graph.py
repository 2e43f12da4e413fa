"""A small graph builder over `onnx.helper`: nodes get unique names, initializers keep ours.

Encoder activations are 2-D `[tokens, features]` wherever they can be (norms, Linears, MLPs), so
every float Linear is one standard `Gemm` with the hub weight `[out, in]` as stored (`transB=1`):
the initializers are the hub tensors byte for byte, no transposed copies. Decoder graphs (which
need ONNX Runtime's contrib ops anyway) keep `[batch, seq, features]` (`Graph.batched`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization; old enough for most converters (Ascend ATC, TensorRT)
MS_DOMAIN = "com.microsoft"
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32


class Graph:
    """Nodes and initializers of one graph; `op(...)` returns the output name(s)."""

    def __init__(self, name: str, weight_dtype: np.dtype = np.float32):
        self.name = name
        self.weight_dtype = np.dtype(weight_dtype)  # float16: stored halved, computed in fp32
        self.batched = False  # activations [batch, seq, features] (decoders), else [tokens, ...]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains = {"": OPSET}
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self._weights: dict[str, str] = {}

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"/{stem}_{self._count}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", names=(),
           omit=(), **attrs):  # fmt: skip
        """Add one node; `None` inputs stand for omitted optional ones; `names` name its first
        outputs (graph outputs written in place, no Identity copy); `omit`: indices of optional
        outputs left unnamed (not computed)."""
        name = self._fresh(op_type)
        names = [*names, *[""] * (n_out - len(names))]
        outs = ["" if i in omit else names[i] or f"{name}/out{i}" for i in range(n_out)]
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=name, domain=domain, **attrs))
        if domain:
            self.domains.setdefault(domain, 1)
        return outs[0] if n_out == 1 else tuple(outs)

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer named `name` holding `array` exactly (integers, fixed-dtype data)."""
        if name not in self.initializers:
            array = np.asarray(array, order="C")  # (not ascontiguousarray: it makes scalars 1-D)
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float weight in the graph's storage dtype, as an fp32 value for compute."""
        if name in self._weights:
            return self._weights[name]
        stored = self.tensor(name, np.asarray(array, dtype=self.weight_dtype))
        value = stored if self.weight_dtype == np.float32 else self.op("Cast", stored, to=FLOAT)
        self._weights[name] = value
        return value

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between nodes."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(f"/const_{len(self._consts)}", arr)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Graph output `name` (an Identity of `value`; None: a node already writes `name`)."""
        if value is not None:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"/out/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values())
        )
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="slimport")
        model.doc_string = doc
        return model

    # ------------------------------------------------------------ common layers

    def linear(self, x: str, weight: str, bias: str | None = None, trans_b: int = 1) -> str:
        """x [tokens, in] @ W^T (+ b): W is [out, in] as stored (GPT-2's Conv1D: [in, out]).
        In a graph of [batch, seq, features] activations (`batched`), the same product as ORT's
        FusedMatMul, which takes the weight as stored too (its transB)."""
        if not self.batched:
            return self.op("Gemm", x, weight, bias, transB=trans_b)
        y = self.op("FusedMatMul", x, weight, domain=MS_DOMAIN, transB=trans_b)
        return y if bias is None else self.op("Add", y, bias)

    def layer_norm(self, x: str, weight: str, bias: str | None, eps: float) -> str:
        if bias is None:  # LayerNormalization's bias is optional, its scale is not
            return self.op("LayerNormalization", x, weight, axis=-1, epsilon=float(eps))
        return self.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=float(eps))

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm (fp32): ORT's fused
        kernel (registered in the default domain, as onnxruntime-genai's builder emits it)."""
        return self.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=float(eps),
                       stash_type=1)  # fmt: skip

    def skip_rms_norm(self, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
        """(rms_norm(residual + x), residual + x) in one kernel."""
        out = self.op("SkipSimplifiedLayerNormalization", x, residual, weight, n_out=4,
                      domain=MS_DOMAIN, epsilon=float(eps), omit=(1, 2))  # fmt: skip
        return out[0], out[3]  # (mean and 1/std omitted: the kernel then skips writing them)

    def act(self, x: str, kind: str) -> str:
        if kind == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        if kind == "relu":
            return self.op("Relu", x)
        if kind == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
            erf = self.op("Erf", self.op("Mul", x, self.const(1 / np.sqrt(2), np.float32)))
            half = self.op("Mul", x, self.const(0.5, np.float32))
            return self.op("Mul", half, self.op("Add", erf, self.const(1.0, np.float32)))
        if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = self.op("Mul", self.op("Mul", x, x), x)
            inner = self.op("Add", x, self.op("Mul", cube, self.const(0.044715, np.float32)))
            t = self.op("Tanh", self.op("Mul", inner, self.const(np.sqrt(2 / np.pi), np.float32)))
            half = self.op("Mul", x, self.const(0.5, np.float32))
            return self.op("Mul", half, self.op("Add", t, self.const(1.0, np.float32)))
        raise ValueError(kind)  # callers map config names through ACTIVATIONS first

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, shape if isinstance(shape, str) else self.const(shape))

    def dim(self, x: str, axis: int) -> str:
        """Dimension `axis` of x as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)


# transformers' activation names -> the builder's
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
