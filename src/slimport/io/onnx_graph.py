"""What an exported ONNX graph says about its weights: each initializer's role, named the way
Hugging Face names the parameter, and the model config its shapes and constants imply.

`torch.onnx.export` keeps module names for biases, norms and embeddings, but a Linear weight
becomes an anonymous `[in, out]` initializer (`onnx::MatMul_470`, dynamo: `val_37`) and equal
tensors are stored once (every zero bias one initializer). The consuming node still knows its
module: TorchScript names nodes by scope (`/encoder/layer.0/attention/self/query/MatMul`), the
dynamo exporter records `pkg.torch.onnx.name_scopes`. A weight is named `<module>.weight` after
the node that uses it, so the role recovery needs no model family: arch turns the names and the
partial config into a family (`arch.guess_config`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, helper, numpy_helper

# initializer names the exporters invent: TorchScript `onnx::MatMul_12`, dynamo `val_37`
_ANONYMOUS = re.compile(r"^(onnx::.*|_?val_\d+)$")
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")
# activation op -> HF hidden_act (Gelu carries its approximation as an attribute)
_ACTS = {"Erf": "gelu", "Tanh": "gelu_new", "Sigmoid": "silu", "Relu": "relu"}


@dataclass(frozen=True)
class Role:
    """An initializer used as a module parameter: its HF name, and whether the exporter stored
    it transposed (`[in, out]` for a MatMul)."""

    source: str
    transposed: bool


def is_anonymous(name: str) -> bool:
    return bool(_ANONYMOUS.match(name))


def scope(node: NodeProto) -> str | None:
    """The module path of the node, `encoder.layer.0.attention.self.query`; None if unknown."""
    for p in node.metadata_props:  # dynamo: ['', 'encoder', ..., '<module path>', '<fx node>']
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 else None
    if node.name.startswith("/"):  # TorchScript: /encoder/layer.0/attention/self/query/MatMul
        return ".".join(node.name.split("/")[1:-1])
    return None


class Graph:
    """Producers, consumers and constant values of a graph, for the pattern queries below."""

    def __init__(self, graph: GraphProto, small: dict[str, np.ndarray]):
        self.g = graph
        self.inits = {t.name: tuple(t.dims) for t in graph.initializer}
        self.small = small  # decoded small initializers (shape constants, scalars)
        # TorchScript stores equal tensors once and names the copies with Identity nodes
        self.source = {n.output[0]: n.input[0] for n in graph.node
                       if n.op_type == "Identity" and n.input and n.input[0] in self.inits}  # fmt: skip
        for alias, src in self.source.items():
            self.inits[alias] = self.inits[src]
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = {}
        for n in graph.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, a Concat/Cast/Unsqueeze of
        constants); None when it depends on the input."""
        if name in self.small:
            return self.small[name]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    return np.asarray(helper.get_attribute_value(a))
        if node.op_type in ("Cast", "Identity", "Unsqueeze") and node.input:
            v = self.const(node.input[0])
            return None if v is None else np.reshape(v, -1) if node.op_type == "Unsqueeze" else v
        return None

    def reads(self, name: str, source: str | None, hops: int = 4) -> bool:
        """Whether tensor `name` is `source` seen through a few views (Reshape, Cast, ...)."""
        for _ in range(hops + 1):
            if name == source:
                return True
            node = self.producer.get(name)
            if node is None or node.op_type not in (
                "Reshape",
                "Cast",
                "Unsqueeze",
                "Squeeze",
                "Flatten",
            ):
                return False
            name = node.input[0]
        return False

    def shape_tail(self, name: str) -> list[int | None]:
        """The entries of a Reshape's shape input, None where computed from the input."""
        v = self.const(name)
        if v is not None:
            return [int(x) for x in np.reshape(v, -1)]
        node = self.producer.get(name)
        if node is None or node.op_type != "Concat":
            return [None]
        out: list[int | None] = []
        for i in node.input:
            v = self.const(i)
            out += [None] if v is None else [int(x) for x in np.reshape(v, -1)]
        return out


def roles(g: Graph) -> dict[str, Role]:
    """HF parameter name -> the initializer that holds it, from the nodes that use initializers."""
    out: dict[str, Role] = {}

    def add(node: NodeProto, init: str, kind: str, transposed: bool = False) -> None:
        where, source = scope(node), g.source.get(init, init)
        # a named initializer is a parameter only if named like one (not `rotary_emb.inv_freq`)
        if where and (is_anonymous(source) and kind == "weight" or source.endswith("." + kind)):
            # a named parameter is stored as its module holds it (GPT-2's Conv1D: [in, out])
            out.setdefault(f"{where}.{kind}", Role(source, transposed and is_anonymous(source)))

    for n in g.g.node:
        ins = list(n.input)
        init = [i in g.inits for i in ins]
        op = n.op_type
        if op == "Gather" and init[0] and len(g.inits[ins[0]]) == 2:
            add(n, ins[0], "weight")
        elif op == "MatMul" and len(ins) == 2 and init[1] and len(g.inits[ins[1]]) == 2:
            add(n, ins[1], "weight", transposed=True)
        elif op == "Gemm" and init[1]:
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            add(n, ins[1], "weight", transposed=not trans_b)
            if len(ins) > 2 and init[2]:
                add(n, ins[2], "bias")
        elif op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            for i, kind in ((1, "weight"), (2, "bias")):
                if len(ins) > i and init[i]:
                    add(n, ins[i], kind)
        elif op in ("Add", "Mul") and any(init) and not all(init):
            name = ins[init.index(True)]
            if len(g.inits[name]) != 1 or g.inits[name][0] < 2:
                continue  # scalars: scaling and eps constants
            other = g.producer.get(ins[init.index(False)])
            if op == "Add" and other is not None and other.op_type in ("MatMul", "Mul", "Div"):
                add(n, name, "bias")  # Linear bias after its MatMul, decomposed LayerNorm's beta
            elif op == "Mul":
                add(n, name, "weight")  # RMSNorm (and decomposed LayerNorm) scale
    return out


def config(g: Graph, named: dict[str, tuple[int, ...]]) -> dict:
    """The config keys the graph shows (no model_type: naming the family is arch's job).

    `named` maps the recovered HF names to their hub shapes.
    """
    cfg: dict = {}
    ids = next((i.name for i in g.g.input if i.type.tensor_type.elem_type in (6, 7)), None)
    for n in g.g.node:  # the token embedding: the table the first integer input indexes
        if n.op_type == "Gather" and n.input[0] in g.inits and g.reads(n.input[1], ids):
            cfg["vocab_size"], cfg["hidden_size"] = (int(d) for d in g.inits[n.input[0]])
            break
    hidden = cfg.get("hidden_size")
    layers = {(m[1], int(m[2])) for name in named if (m := _LAYER.match(name))}
    if layers:
        prefix = max({p for p, _ in layers}, key=lambda p: sum(q == p for q, _ in layers))
        cfg["num_hidden_layers"] = 1 + max(i for p, i in layers if p == prefix)
        block = f"{prefix}.0."
        downs = [
            s[1] for k, s in named.items() if k.startswith(block) and len(s) == 2 and s[0] == hidden
        ]
        if downs:
            cfg["intermediate_size"] = max(downs)
    cfg.update(_heads(g, hidden))
    cfg.update(_norm_eps(g))
    if act := _activation(g):
        cfg["hidden_act"] = act
    if theta := _rope_theta(g):
        cfg["rope_theta"] = theta
    return cfg


def _heads(g: Graph, hidden: int | None) -> dict:
    """Head counts from the Reshape `[batch, seq, heads, head_dim]` after the first block's
    projections: the widest is the query, the narrowest the key/value (grouped-query). A fused
    QKV projection reaches its Reshapes through a Split, which divides its width, or through
    Slices of the last axis, each taking its constant part."""
    counts: list[tuple[int, int]] = []
    for n in g.g.node:
        if n.op_type not in ("MatMul", "Gemm") or n.input[1] not in g.inits:
            continue
        w = g.inits[n.input[1]]
        trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        front = [(n.output[0], w[0] if trans_b else w[-1])]
        for _ in range(4):  # bias Add, views, the Split of a fused projection
            step = []
            for name, width in front:
                for c in g.consumers.get(name, []):
                    if c.op_type == "Split":
                        step += [(o, width // len(c.output)) for o in c.output]
                    elif c.op_type == "Slice" and c.input[0] == name:
                        if part := _slice_width(g, c, width):
                            step.append((c.output[0], part))
                    elif c.op_type == "Reshape" and c.input[0] == name:
                        shape = g.shape_tail(c.input[1])
                        if len(shape) == 4 and (shape[-1] or 0) > 0 and width % shape[-1] == 0:
                            counts.append((width // shape[-1], shape[-1]))
                        else:
                            step.append((c.output[0], width))
                    elif c.op_type in ("Add", "Cast"):
                        step.append((c.output[0], width))
            front = step
        if len(counts) >= 3:  # q, k, v of the first block
            break
    if not counts:
        return {}
    heads, head_dim = max(counts)
    cfg = {"num_attention_heads": heads}
    if min(counts)[0] < heads:
        cfg["num_key_value_heads"] = min(counts)[0]
    if hidden is not None and heads * head_dim != hidden:
        cfg["head_dim"] = head_dim
    return cfg


def _slice_width(g: Graph, node: NodeProto, width: int) -> int | None:
    """How much of the last axis (`width` wide) a Slice with constant bounds keeps; None when
    it slices another axis, steps, or has bounds computed from the input."""
    ins = [*node.input, "", ""][:5]
    starts, ends = g.const(ins[1]), g.const(ins[2])
    axes = g.const(ins[3]) if ins[3] else None
    steps = g.const(ins[4]) if ins[4] else None
    if starts is None or ends is None or axes is None or starts.size != 1 or ends.size != 1:
        return None
    if int(np.reshape(axes, -1)[0]) not in (-1, 2) or (steps is not None and steps.size != 1):
        return None  # [batch, seq, width]: the last axis is -1 or 2
    if steps is not None and int(np.reshape(steps, -1)[0]) != 1:
        return None

    def clamp(i: int) -> int:
        return min(max(i + width if i < 0 else i, 0), width)

    part = clamp(int(np.reshape(ends, -1)[0])) - clamp(int(np.reshape(starts, -1)[0]))
    return part if part > 0 else None


def _norm_eps(g: Graph) -> dict:
    """Norm epsilon: the attribute of a fused norm, or the constant added to the mean of the
    decomposed one (RMSNorm when no mean is subtracted first)."""
    for n in g.g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "LayerNormalization":
            return {"layer_norm_eps": _round(attrs.get("epsilon", 1e-5))}
        if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
            return {"rms_norm_eps": _round(attrs.get("epsilon", 1e-5))}
        if n.op_type == "ReduceMean":
            src = g.producer.get(n.input[0])
            for add in g.consumers.get(n.output[0], []):
                other = [i for i in add.input if i != n.output[0]]
                eps = g.const(other[0]) if add.op_type == "Add" and other else None
                if eps is not None and eps.size == 1 and src is not None and src.op_type == "Pow":
                    pre = g.producer.get(src.input[0])
                    key = (
                        "layer_norm_eps"
                        if pre is not None and pre.op_type == "Sub"
                        else "rms_norm_eps"
                    )
                    return {key: _round(float(eps.reshape(-1)[0]))}
    return {}


def _activation(g: Graph) -> str | None:
    for n in g.g.node:
        if n.op_type == "Gelu":
            approx = next((a.s.decode() for a in n.attribute if a.name == "approximate"), "none")
            return "gelu_new" if approx == "tanh" else "gelu"
        if n.op_type in _ACTS and scope(n) and _LAYER.match(scope(n) + "."):
            return _ACTS[n.op_type]
    return None


def _rope_theta(g: Graph) -> float | None:
    """RoPE base from the `inv_freq = theta ** (-i / (d/2))` table (a buffer initializer, or a
    Constant node where TorchScript folded it): the one geometric series starting at 1."""
    values = [*g.small.values()]
    values += [
        v for n in g.g.node if n.op_type == "Constant" and (v := g.const(n.output[0])) is not None
    ]
    for v in values:
        f = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.dtype.kind != "f" or f.size < 2 or abs(f[0] - 1.0) > 1e-6 or not 0 < f[1] < 1:
            continue
        if np.allclose(f, f[1] ** np.arange(f.size), rtol=1e-4):
            return _round(float(f[1] ** (-f.size)))
    return None


def _round(x: float) -> float:
    """A float32 constant back to the decimal it was written as (1e-12, not 9.99999996e-13)."""
    return float(f"{x:.6g}")
