"""Decoder graphs (Llama family incl. GQA / tied embeddings / Qwen2 qkv bias, and GPT-2) with a
KV cache, in the layout onnxruntime-genai and Optimum use:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64,
           position_ids [batch, seq] int64 (GPT-2 only: its learned positions),
           past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key|value [batch, kv_heads, past+seq, head_dim]

A decode step feeds one token and the previous step's presents: it costs one token of compute.
Activations stay [batch, seq, features] (no reshapes: MatMulNBits, the norms and attention all
take them; a float Linear is `FusedMatMul` on the weight as stored). Attention is ONNX Runtime's
fused `com.microsoft::GroupQueryAttention` (CPU kernel; grouped queries without repeated keys,
the cache append in place) on q/k/v packed where one MatMulNBits computes them, with RoPE inside
it (do_rotary), RMSNorm + residual `SkipSimplifiedLayerNormalization`, as onnxruntime-genai's
builder builds them. Left padding: every row counts all `past+seq` positions (GQA's seqlens_k),
and the padded keys are masked by an additive bias from attention_mask.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.runtime.onnx.graph import ACTIVATIONS, FLOAT, INT32, INT64, MS_DOMAIN, Graph
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
    """Graph inputs and the values every layer shares (shapes, lengths, the attention bias).
    position_ids only where the graph reads them (GPT-2's learned positions): RoPE runs inside
    GroupQueryAttention at each token's index in the cache (see `_attention`)."""

    def __init__(self, g: Graph, n_layers: int, n_kv: int, head_dim: int, positions: bool):
        self.ids = g.input("input_ids", INT64, ["batch", "seq"])
        self.mask = g.input("attention_mask", INT64, ["batch", "total"])
        self.positions = g.input("position_ids", INT64, ["batch", "seq"]) if positions else None
        for i in range(n_layers):
            for kv in ("key", "value"):
                g.input(PAST.format(i, kv), FLOAT, ["batch", n_kv, "past", head_dim])
        total = g.op("Gather", g.op("Shape", self.mask), g.const(1))  # scalar
        # GroupQueryAttention's lengths (int32): total_sequence_length, and seqlens_k = total - 1
        # for every row, padded or not (it assumes right padding; ours is masked by the bias)
        self.total = g.op("Cast", total, to=INT32)
        batch = g.dim(self.ids, 0)
        self.seqlens = g.op("Cast", g.op("Expand", g.op("Sub", total, g.const(1)), batch), to=INT32)
        # the bias masks the padded keys only: GroupQueryAttention is causal itself
        padded = g.op("Cast", g.op("Unsqueeze", self.mask, g.const([1, 2])), to=9)  # bool
        bias = g.op("Where", padded, g.const(0.0, np.float32), g.const(NEG, np.float32))
        shape = g.op("Concat", g.dim(self.ids, 0), g.const([1]), g.dim(self.ids, 1),
                     g.dim(self.mask, 1), axis=0)  # fmt: skip
        self.bias = g.op("Expand", bias, shape)  # [batch, 1, seq, total]


def _attention(g, inp: _Inputs, layer, qkv, n_heads, n_kv, hd, scale, rope=None) -> str:
    """qkv: q/k/v packed [batch, seq, (heads + 2 kv) * hd] or a (q, k, v) triple -> context
    [batch, seq, heads*hd]; writes the presents. rope: (cos, sin) caches [positions, hd/2], applied
    by GroupQueryAttention itself (do_rotary) at each token's index in the (left-padded) cache,
    not at its position_ids: a left-padded row is rotated `pad` positions further on, queries and
    keys alike, and RoPE's scores depend only on their distance, so the result is the same."""
    parts = [qkv] if isinstance(qkv, str) else list(qkv)
    q, k, v = parts + [None] * (3 - len(parts))
    cos, sin = rope or (None, None)
    past = [PAST.format(layer, kv) for kv in ("key", "value")]
    present = [PRESENT.format(layer, kv) for kv in ("key", "value")]
    ctx = g.op("GroupQueryAttention", q, k, v, *past, inp.seqlens, inp.total, cos, sin, None,
               inp.bias, n_out=3, names=["", *present], domain=MS_DOMAIN, num_heads=n_heads,
               kv_num_heads=n_kv, scale=float(scale), do_rotary=int(rope is not None))[0]  # fmt: skip
    for name in present:
        g.output(None, name, FLOAT, ["batch", n_kv, "total", hd])
    return ctx


def _logits(g: Graph, w: Weights, inp: _Inputs, h: str, head: str, vocab: int) -> None:
    """The LM head; a tied one multiplies by the embedding initializer itself."""
    logits = w.tied_head(g, h, head) if head.endswith(".weight") else w.linear(g, h, head)
    g.output(logits, "logits", FLOAT, ["batch", "seq", vocab])


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
    vocab, eps = int(cfg["vocab_size"]), float(cfg["rms_norm_eps"])
    act = _act(cfg, "hidden_act")
    g.batched = True
    inp = _Inputs(g, n_layers, n_kv, hd, positions=False)
    cos_table, sin_table = _rope_tables(config, cfg)
    half = hd // 2  # rotate-half tables repeat their first half: GQA's caches are that half
    rope = (
        g.tensor("/rope/cos", np.ascontiguousarray(cos_table[:, :half])),
        g.tensor("/rope/sin", np.ascontiguousarray(sin_table[:, :half])),
    )
    embed = "model.embed_tokens.weight"
    h = w.lookup(g, embed, inp.ids)
    scale = hd**-0.5
    x = g.rms_norm(h, w.value(g, "model.layers.0.input_layernorm.weight"), eps)
    for i in range(n_layers):  # h: the residual stream; x: its norm, the next block's input
        p = f"model.layers.{i}."
        qkv = w.linears(g, x, [f"{p}self_attn.{n}_proj" for n in "qkv"])
        ctx = _attention(g, inp, i, qkv, n_heads, n_kv, hd, scale, rope)
        attn = w.linear(g, ctx, p + "self_attn.o_proj")
        x, h = g.skip_rms_norm(attn, h, w.value(g, p + "post_attention_layernorm.weight"), eps)
        gate, up = w.linears(g, x, [p + "mlp.gate_proj", p + "mlp.up_proj"], split=True)
        gate = g.act(gate, act)
        mlp = w.linear(g, g.op("Mul", gate, up), p + "mlp.down_proj")
        following = f"model.layers.{i + 1}.input_layernorm" if i + 1 < n_layers else "model.norm"
        x, h = g.skip_rms_norm(mlp, h, w.value(g, following + ".weight"), eps)
    _logits(g, w, inp, x, embed if cfg["tie_word_embeddings"] else "lm_head", vocab)


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
    g.batched = True
    inp = _Inputs(g, n_layers, n_heads, hd, positions=True)
    b = cfg["base"]
    tokens = w.lookup(g, b + "wte.weight", inp.ids)
    positions = g.op("Gather", w.value(g, b + "wpe.weight"), inp.positions)
    h = g.op("Add", tokens, positions)
    for i in range(n_layers):
        p = f"{b}h.{i}."
        scale = hd**-0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            scale /= i + 1
        qkv = w.linear(
            g, w.layer_norm(g, p + "ln_1", h, eps), p + "attn.c_attn", trans_b=0
        )  # Conv1D: [in, out]
        ctx = _attention(g, inp, i, qkv, n_heads, n_heads, hd, scale)  # c_attn: q|k|v packed
        h = g.op("Add", h, w.linear(g, ctx, p + "attn.c_proj", trans_b=0))
        x = g.act(w.linear(g, w.layer_norm(g, p + "ln_2", h, eps), p + "mlp.c_fc", trans_b=0), act)
        h = g.op("Add", h, w.linear(g, x, p + "mlp.c_proj", trans_b=0))
    h = w.layer_norm(g, b + "ln_f", h, eps)
    _logits(g, w, inp, h, b + "wte.weight" if cfg["tie_word_embeddings"] else "lm_head", vocab)


BUILDERS = {"llama": llama, "gpt2": gpt2}  # family name -> graph builder
