"""Encoder graphs: BERT, RoBERTa (XLM-R), DistilBERT, bare or with their classification heads.

inputs   input_ids, attention_mask [batch, seq] int64 (+ token_type_ids for BERT/RoBERTa)
outputs  last_hidden_state [batch, seq, hidden]; pooler_output [batch, hidden] when the model
         has a pooler; logits [batch, labels] (sequence) or [batch, seq, labels] (token heads)
"""

from __future__ import annotations

import numpy as np

from slimport.errors import SlimportError
from slimport.runtime.onnx.decoder import NEG, _act
from slimport.runtime.onnx.graph import FLOAT, INT64, Graph
from slimport.runtime.onnx.weights import Weights

# per family: layer prefix, the six Linears (q, k, v, attention out, up, down), the two norms
_LAYERS = {
    "bert": (
        "encoder.layer.{}.",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("attention.output.LayerNorm", "output.LayerNorm"),
    ),  # fmt: skip
    "distilbert": (
        "transformer.layer.{}.",
        (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ),
        ("sa_layer_norm", "output_layer_norm"),
    ),  # fmt: skip
}
_LAYERS["roberta"] = _LAYERS["bert"]


def encoder(g: Graph, w: Weights, config: dict, cfg: dict, family: str) -> None:
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise SlimportError(
            f"position_embedding_type={cfg['position_embedding_type']!r}: only absolute "
            "position embeddings are built for ONNX"
        )
    hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    hd, eps = hidden // n_heads, float(cfg["layer_norm_eps"])
    act = _act(cfg, "activation" if family == "distilbert" else "hidden_act")
    b = cfg["base"]
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "seq"])
    batch_seq = g.op("Shape", ids)
    shape = lambda *tail: g.op("Concat", batch_seq, g.const(list(tail)), axis=0)  # noqa: E731

    # embeddings
    e = b + "embeddings."
    h = w.lookup(g, e + "word_embeddings.weight", ids)
    if family == "roberta":  # positions count non-padding tokens from padding_idx + 1
        pad = g.const(int(cfg.get("pad_token_id", 1)))
        real = g.op("Cast", g.op("Not", g.op("Equal", ids, pad)), to=INT64)
        positions = g.op("Add", g.op("Mul", g.op("CumSum", real, g.const(1)), real), pad)
    else:
        seq = g.op("Gather", batch_seq, g.const(1))
        positions = g.op("Unsqueeze", g.op("Range", g.const(0), seq, g.const(1)), g.const([0]))
    h = g.op("Add", h, g.op("Gather", w.value(g, e + "position_embeddings.weight"), positions))
    if family != "distilbert":
        types = g.input("token_type_ids", INT64, ["batch", "seq"])
        h = g.op("Add", h, g.op("Gather", w.value(g, e + "token_type_embeddings.weight"), types))
    h = g.reshape(w.layer_norm(g, e + "LayerNorm", h, eps), [-1, hidden])

    # padding mask as an additive bias [batch, 1, 1, seq]
    keep = g.op("Cast", g.op("Unsqueeze", mask, g.const([1, 2])), to=9)
    bias = g.op("Where", keep, g.const(0.0, np.float32), g.const(NEG, np.float32))
    layer, linears, norms = _LAYERS[family]
    pruned = {int(k): v for k, v in (cfg.get("pruned_heads") or {}).items()}  # BERT: per layer
    for i in range(int(cfg["num_hidden_layers"])):
        p = b + layer.format(i)
        q, k, v, out, up, down = (p + n for n in linears)
        n = n_heads - len(pruned.get(i, ()))
        heads = lambda x, n=n: g.op("Transpose", g.reshape(x, shape(n, hd)), perm=[0, 2, 1, 3])  # noqa: E731
        qh, kh, vh = heads(w.linear(g, h, q)), heads(w.linear(g, h, k)), heads(w.linear(g, h, v))
        scores = g.op("MatMul", qh, g.op("Transpose", kh, perm=[0, 1, 3, 2]))
        scores = g.op("Add", g.op("Mul", scores, g.const(hd**-0.5, np.float32)), bias)
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), vh)
        ctx = g.reshape(g.op("Transpose", ctx, perm=[0, 2, 1, 3]), [-1, n * hd])
        h = w.layer_norm(g, p + norms[0], g.op("Add", w.linear(g, ctx, out), h), eps)
        x = g.act(w.linear(g, h, up), act)
        h = w.layer_norm(g, p + norms[1], g.op("Add", w.linear(g, x, down), h), eps)

    h3 = g.reshape(h, shape(hidden))
    g.output(h3, "last_hidden_state", FLOAT, ["batch", "seq", hidden])
    first = g.op("Gather", h3, g.const(0), axis=1)  # [CLS] / <s>: [batch, hidden]
    if cfg.get("add_pooling_layer"):
        pooled = g.op("Tanh", w.linear(g, first, b + "pooler.dense"))
        g.output(pooled, "pooler_output", FLOAT, ["batch", hidden])
    head, labels = cfg.get("head"), int(cfg.get("num_labels", 0))
    if head is None:
        return
    if "TokenClassification" in cfg["architecture"]:
        logits = g.reshape(w.linear(g, h, "classifier"), shape(labels))
        g.output(logits, "logits", FLOAT, ["batch", "seq", labels])
        return
    if head == "linear":  # BERT: the classifier reads the pooler
        logits = w.linear(g, pooled, "classifier")
    elif head == "roberta":
        logits = w.linear(
            g, g.op("Tanh", w.linear(g, first, "classifier.dense")), "classifier.out_proj"
        )
    else:  # distil
        logits = w.linear(g, g.op("Relu", w.linear(g, first, "pre_classifier")), "classifier")
    g.output(logits, "logits", FLOAT, ["batch", labels])


BUILDERS = {f: (lambda g, w, c, n, f=f: encoder(g, w, c, n, f)) for f in _LAYERS}
