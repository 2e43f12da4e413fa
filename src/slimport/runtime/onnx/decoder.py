"""Decoder graphs (Llama family incl. GQA / tied embeddings / Qwen2 qkv bias, and GPT-2) with a
KV cache, in the layout onnxruntime-genai and Optimum use:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64,
           position_ids [batch, seq] int64, past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key|value [batch, kv_heads, past+seq, head_dim]

A decode step feeds one token and the previous step's presents: it costs one token of compute.
Attention keeps queries grouped by their KV head, `[batch, kv_heads, group, seq, head_dim]`, so
grouped-query attention is a broadcasting MatMul (no repeated keys).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.runtime.onnx.graph import ACTIVATIONS, FLOAT, INT64, Graph
from slimport.runtime.onnx.weights import Weights

PAST, PRESENT = "past_key_values.{}.{}", "present.{}.{}"
NEG = float(np.finfo(np.float32).min)


def _act(cfg: dict, key: str) -> str:
    kind = ACTIVATIONS.get(cfg[key])
    if kind is None:
        raise SlimportError(
            f"config {key}={cfg[key]!r}: the ONNX builder knows " + ", ".join(sorted(ACTIVATIONS))
        )
    return kind


class _Inputs:
    """Graph inputs and the values every layer shares (shapes, the attention bias)."""

    def __init__(self, g: Graph, n_layers: int, n_kv: int, head_dim: int):
        self.ids = g.input("input_ids", INT64, ["batch", "seq"])
        self.mask = g.input("attention_mask", INT64, ["batch", "total"])
        self.positions = g.input("position_ids", INT64, ["batch", "seq"])
        for i in range(n_layers):
            for kv in ("key", "value"):
                g.input(PAST.format(i, kv), FLOAT, ["batch", n_kv, "past", head_dim])
        self.batch_seq = g.op("Shape", self.ids)  # [2]: batch, seq
        total = g.op("Gather", g.op("Shape", self.mask), g.const(1))
        seq = g.op("Gather", self.batch_seq, g.const(1))
        keys = g.op("Range", g.const(0), total, g.const(1))  # [total]
        queries = g.op("Range", g.op("Sub", total, seq), total, g.const(1))  # absolute positions
        causal = g.op("LessOrEqual", keys, g.op("Unsqueeze", queries, g.const([1])))  # [seq, total]
        padded = g.op("Cast", g.op("Unsqueeze", self.mask, g.const([1, 2, 3])), to=9)  # bool
        allowed = g.op("And", causal, padded)  # [batch, 1, 1, seq, total]
        self.bias = g.op("Where", allowed, g.const(0.0, np.float32), g.const(NEG, np.float32))

    def shape(self, g: Graph, *tail: int) -> str:
        return g.op("Concat", self.batch_seq, g.const(list(tail)), axis=0)


def _rotate(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin (transformers' rotate-half RoPE)."""
    x1, x2 = g.op("Split", x, g.const([half, half]), n_out=2, axis=-1)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _attention(g, inp: _Inputs, layer, q, k, v, n_heads, n_kv, hd, scale, rope=None) -> str:
    """q [tokens, heads*hd], k/v [tokens, kv*hd] -> context [tokens, heads*hd]; adds the presents."""
    group = n_heads // n_kv
    q = g.op("Transpose", g.reshape(q, inp.shape(g, n_kv, group, hd)), perm=[0, 2, 3, 1, 4])
    k = g.op("Transpose", g.reshape(k, inp.shape(g, n_kv, hd)), perm=[0, 2, 1, 3])
    v = g.op("Transpose", g.reshape(v, inp.shape(g, n_kv, hd)), perm=[0, 2, 1, 3])
    if rope is not None:  # cos/sin [batch, seq, hd], broadcast over the head axes
        cos, sin = rope
        k_axes, q_axes = g.const([1]), g.const([1, 2])
        k = _rotate(g, k, g.op("Unsqueeze", cos, k_axes), g.op("Unsqueeze", sin, k_axes), hd // 2)
        q = _rotate(g, q, g.op("Unsqueeze", cos, q_axes), g.op("Unsqueeze", sin, q_axes), hd // 2)
    presents = []
    for kv, new in (("key", k), ("value", v)):
        present = g.op("Concat", PAST.format(layer, kv), new, axis=2)
        g.output(present, PRESENT.format(layer, kv), FLOAT, ["batch", n_kv, "total", hd])
        presents.append(g.op("Unsqueeze", present, g.const([2])))  # [batch, kv, 1, total, hd]
    keys_t = g.op("Transpose", presents[0], perm=[0, 1, 2, 4, 3])
    scores = g.op("Mul", g.op("MatMul", q, keys_t), g.const(scale, np.float32))
    probs = g.op("Softmax", g.op("Add", scores, inp.bias), axis=-1)
    ctx = g.op("Transpose", g.op("MatMul", probs, presents[1]), perm=[0, 3, 1, 2, 4])
    return g.reshape(ctx, [-1, n_heads * hd])


def _logits(g: Graph, w: Weights, inp: _Inputs, h: str, head: str, vocab: int) -> None:
    """The LM head; a tied one multiplies by the embedding initializer itself."""
    logits = w.tied_head(g, h, head) if head.endswith(".weight") else w.linear(g, h, head)
    g.output(g.reshape(logits, inp.shape(g, vocab)), "logits", FLOAT, ["batch", "seq", vocab])


# ---------------------------------------------------------------- Llama family


def _rope_tables(config: dict, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim] as transformers computes them: the default formula here,
    scaled variants (linear, llama3, yarn, ...) by transformers' own rotary module."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    positions = torch.arange(int(cfg["max_position_embeddings"]))
    if kind == "default":
        hd = int(cfg["head_dim"])
        inv_freq = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, hd, 2).float() / hd))
        freqs = positions.float()[:, None] * inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().numpy(), emb.sin().numpy()
    if kind == "dynamic":
        raise SlimportError(
            "rope_scaling type 'dynamic' changes with the sequence length: no fixed ONNX table"
        )
    import transformers

    mt = cfg["model_type"]
    module = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    rotary_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    hf_config = transformers.AutoConfig.for_model(
        **{k: v for k, v in config.items() if k != "quantization_config"}
    )
    with torch.no_grad():
        cos, sin = rotary_cls(hf_config)(torch.zeros(1), positions[None])
    return cos[0].float().numpy(), sin[0].float().numpy()


def llama(g: Graph, w: Weights, config: dict, cfg: dict) -> None:
    n_layers, n_heads, n_kv, hd = (
        int(cfg[k])
        for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    hidden, vocab, eps = int(cfg["hidden_size"]), int(cfg["vocab_size"]), float(cfg["rms_norm_eps"])
    act = _act(cfg, "hidden_act")
    inp = _Inputs(g, n_layers, n_kv, hd)
    cos_table, sin_table = _rope_tables(config, cfg)
    rope = (
        g.op("Gather", g.tensor("/rope/cos", cos_table), inp.positions),
        g.op("Gather", g.tensor("/rope/sin", sin_table), inp.positions),
    )
    embed = "model.embed_tokens.weight"
    h = g.reshape(w.lookup(g, embed, inp.ids), [-1, hidden])
    scale = hd**-0.5
    for i in range(n_layers):
        p = f"model.layers.{i}."
        x = g.rms_norm(h, w.value(g, p + "input_layernorm.weight"), eps)
        q, k, v = (w.linear(g, x, f"{p}self_attn.{n}_proj") for n in "qkv")
        ctx = _attention(g, inp, i, q, k, v, n_heads, n_kv, hd, scale, rope)
        h = g.op("Add", h, w.linear(g, ctx, p + "self_attn.o_proj"))
        x = g.rms_norm(h, w.value(g, p + "post_attention_layernorm.weight"), eps)
        gate = g.act(w.linear(g, x, p + "mlp.gate_proj"), act)
        up = w.linear(g, x, p + "mlp.up_proj")
        h = g.op("Add", h, w.linear(g, g.op("Mul", gate, up), p + "mlp.down_proj"))
    h = g.rms_norm(h, w.value(g, "model.norm.weight"), eps)
    _logits(g, w, inp, h, embed if cfg["tie_word_embeddings"] else "lm_head", vocab)


# ---------------------------------------------------------------- GPT-2


def gpt2(g: Graph, w: Weights, config: dict, cfg: dict) -> None:
    n_layers, n_heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    hidden, vocab, eps = (
        int(cfg["hidden_size"]),
        int(cfg["vocab_size"]),
        float(cfg["layer_norm_epsilon"]),
    )
    hd = hidden // n_heads
    if cfg.get("reorder_and_upcast_attn"):
        raise SlimportError("GPT-2 reorder_and_upcast_attn=true is not built for ONNX")
    act = _act(cfg, "activation_function")
    inp = _Inputs(g, n_layers, n_heads, hd)
    b = cfg["base"]
    tokens = w.lookup(g, b + "wte.weight", inp.ids)
    positions = g.op("Gather", w.value(g, b + "wpe.weight"), inp.positions)
    h = g.reshape(g.op("Add", tokens, positions), [-1, hidden])
    for i in range(n_layers):
        p = f"{b}h.{i}."
        scale = hd**-0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            scale /= i + 1
        qkv = w.linear(
            g, w.layer_norm(g, p + "ln_1", h, eps), p + "attn.c_attn", trans_b=0
        )  # Conv1D: [in, out]
        q, k, v = g.op("Split", qkv, g.const([hidden] * 3), n_out=3, axis=-1)
        ctx = _attention(g, inp, i, q, k, v, n_heads, n_heads, hd, scale)
        h = g.op("Add", h, w.linear(g, ctx, p + "attn.c_proj", trans_b=0))
        x = g.act(w.linear(g, w.layer_norm(g, p + "ln_2", h, eps), p + "mlp.c_fc", trans_b=0), act)
        h = g.op("Add", h, w.linear(g, x, p + "mlp.c_proj", trans_b=0))
    h = w.layer_norm(g, b + "ln_f", h, eps)
    _logits(g, w, inp, h, b + "wte.weight" if cfg["tie_word_embeddings"] else "lm_head", vocab)


BUILDERS = {"llama": llama, "gpt2": gpt2}  # family name -> graph builder
