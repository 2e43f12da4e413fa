"""Llama family (Llama, Mistral, Qwen2, SmolLM): hub tensors, dialect tables, config translation."""

from __future__ import annotations

from dataclasses import dataclass

from slimport.arch import gguf_config
from slimport.arch.ops import At, PermuteRope, Tie, Transpose
from slimport.arch.rules import Cond, Family, Kind, Rule, all_of, hub_of, rule


def normalize(cfg: dict) -> dict:
    c = dict(cfg)
    mt = c.setdefault("model_type", "llama")
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    c.setdefault("tie_word_embeddings", False)
    # transformers >= 5 keeps theta in rope_parameters; older configs at the top level
    rope = c.get("rope_parameters") or {}
    c.setdefault("rope_theta", rope.get("rope_theta", 1000000.0 if mt == "qwen2" else 10000.0))
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("hidden_act", "silu")
    if c.get("head_dim") is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    c["q_dim"] = c["num_attention_heads"] * c["head_dim"]
    c["kv_dim"] = c["num_key_value_heads"] * c["head_dim"]
    # Qwen2 always has q/k/v biases; Llama has q/k/v/o biases only with attention_bias.
    c["qkv_bias"] = mt == "qwen2" or bool(c.get("attention_bias", False))
    c["o_bias"] = mt != "qwen2" and bool(c.get("attention_bias", False))
    c["mlp_bias"] = bool(c.get("mlp_bias", False))
    return c


def _tied(c: dict) -> bool:
    return bool(c["tie_word_embeddings"])


def _untied(c: dict) -> bool:
    return not c["tie_word_embeddings"]


def _qkv_bias(c):
    return c["qkv_bias"]


def _o_bias(c):
    return c["o_bias"]


def _mlp_bias(c):
    return c["mlp_bias"]


def _rope_permuted_in_gguf(c):
    return c["model_type"] != "qwen2"  # llama.cpp runs Qwen2 with NEOX (rotate-half) RoPE


H, F = "hidden_size", "intermediate_size"
L = "model.layers.{layer}."  # hub (HF); also our MindSpore Cells and MindFormers
B = "blk.{layer}."  # llama.cpp
C = "layers.{layer}."  # llama2.c (Karpathy's model.py names, Meta's)
K = "model/tf_mistral_for_causal_lm/model/"  # HF TF (TFMistralForCausalLM, the family's only TF model)
KL = K + "layers.{layer}/"
DIALECTS = ("mindspore", "mindformers", "gguf", "llama2c", "keras")


@dataclass(frozen=True)
class LlamaKind(Kind):
    """A row of TABLE: its `names` are in DIALECTS order."""

    rope: str | None = None  # heads key of q/k rows, which interleaved-RoPE dialects permute
    linear: bool = False  # a Dense kernel (Keras stores them [in, out])


# One row per tensor kind, one column per dialect, as gguf-py's TensorNameMap keeps them.
# fmt: off
TABLE = (
    #         hub name, shape                        mindspore, mindformers, gguf, llama2c, keras
    LlamaKind("model.embed_tokens.weight", ("vocab_size", H), (
        "model.embed_tokens.embedding_table", "model.tok_embeddings.embedding_weight", "token_embd.weight",
        "tok_embeddings.weight", K + "embed_tokens/embeddings:0")),
    LlamaKind(L + "input_layernorm.weight", (H,), (
        L + "input_layernorm.weight", L + "attention_norm.weight", B + "attn_norm.weight",
        C + "attention_norm.weight", KL + "input_layernorm/weight:0")),
    LlamaKind(L + "post_attention_layernorm.weight", (H,), (
        L + "post_attention_layernorm.weight", L + "ffn_norm.weight", B + "ffn_norm.weight",
        C + "ffn_norm.weight", KL + "post_attention_layernorm/weight:0")),
    LlamaKind(L + "self_attn.q_proj.weight", ("q_dim", H), (
        L + "self_attn.q_proj.weight", L + "attention.wq.weight", B + "attn_q.weight",
        C + "attention.wq.weight", KL + "self_attn/q_proj/kernel:0"),
        bias=_qkv_bias, rope="num_attention_heads", linear=True),
    LlamaKind(L + "self_attn.k_proj.weight", ("kv_dim", H), (
        L + "self_attn.k_proj.weight", L + "attention.wk.weight", B + "attn_k.weight",
        C + "attention.wk.weight", KL + "self_attn/k_proj/kernel:0"),
        bias=_qkv_bias, rope="num_key_value_heads", linear=True),
    LlamaKind(L + "self_attn.v_proj.weight", ("kv_dim", H), (
        L + "self_attn.v_proj.weight", L + "attention.wv.weight", B + "attn_v.weight",
        C + "attention.wv.weight", KL + "self_attn/v_proj/kernel:0"),
        bias=_qkv_bias, linear=True),
    LlamaKind(L + "self_attn.o_proj.weight", (H, "q_dim"), (
        L + "self_attn.o_proj.weight", L + "attention.wo.weight", B + "attn_output.weight",
        C + "attention.wo.weight", KL + "self_attn/o_proj/kernel:0"),
        bias=_o_bias, linear=True),
    LlamaKind(L + "mlp.gate_proj.weight", (F, H), (
        L + "mlp.gate_proj.weight", L + "feed_forward.w1.weight", B + "ffn_gate.weight",
        C + "feed_forward.w1.weight", KL + "mlp/gate_proj/kernel:0"),
        bias=_mlp_bias, linear=True),
    LlamaKind(L + "mlp.up_proj.weight", (F, H), (
        L + "mlp.up_proj.weight", L + "feed_forward.w3.weight", B + "ffn_up.weight",
        C + "feed_forward.w3.weight", KL + "mlp/up_proj/kernel:0"),
        bias=_mlp_bias, linear=True),
    LlamaKind(L + "mlp.down_proj.weight", (H, F), (
        L + "mlp.down_proj.weight", L + "feed_forward.w2.weight", B + "ffn_down.weight",
        C + "feed_forward.w2.weight", KL + "mlp/down_proj/kernel:0"),
        bias=_mlp_bias, linear=True),
    LlamaKind("model.norm.weight", (H,), (
        "model.norm.weight", "model.norm_out.weight", "output_norm.weight",
        "norm.weight", K + "norm/weight:0")),
    LlamaKind("lm_head.weight", ("vocab_size", H), (
        "lm_head.weight", "lm_head.weight", "output.weight",
        "output.weight", "lm_head/tf_mistral_for_causal_lm/lm_head/kernel:0"),
        linear=True, when=_untied),
)
# fmt: on


@dataclass(frozen=True)
class Layout:
    """How a dialect stores the table's tensors, beyond their names."""

    rope: Cond | None = None  # when q/k rows are interleaved (Meta, llama.cpp): PermuteRope
    kernels_in_out: bool = False  # Dense kernels are [in, out] (Keras): Transpose
    writes_tied_head: bool = False  # a tied lm_head is stored too, as a copy of the embedding: Tie


LAYOUTS = {
    "mindspore": Layout(),  # our Cells mirror the HF module tree
    "mindformers": Layout(),  # MindFormers' own HF->MindSpore converter keeps HF rows
    "gguf": Layout(rope=_rope_permuted_in_gguf),
    "llama2c": Layout(rope=lambda c: True),
    # TF Mistral has no biases and never ties: biases (Qwen2, attention_bias) keep Keras'
    # `bias:0` names, and a tied embedding is also written as the lm_head kernel.
    "keras": Layout(kernels_in_out=True, writes_tied_head=True),
}


def _rules(dialect: str) -> tuple[Rule, ...]:
    """The dialect's column of TABLE as rules: weight then bias of each kind, in table order."""
    layout, col = LAYOUTS[dialect], DIALECTS.index(dialect)
    rope = layout.rope
    out = []
    for k in TABLE:
        name = k.names[col]
        if k.hub == "model.embed_tokens.weight" and layout.writes_tied_head:
            head = (name, TABLE[-1].names[col])
            copy = (At(1, Transpose()),) if layout.kernels_in_out else ()
            out.append(rule(k.hub, head, Tie(), *copy, when=_tied))
            out.append(rule(k.hub, name, when=_untied))
            continue
        kernel = (Transpose(),) if k.linear and layout.kernels_in_out else ()
        for hub, dia, when, is_bias in k.tensors(col):
            ops = () if is_bias else kernel
            if k.rope is None or rope is None:
                out.append(rule(hub, dia, *ops, when=when))
            else:  # two rules, for configs with and without interleaved rows
                out.append(rule(hub, dia, PermuteRope(k.rope), *ops, when=all_of(when, rope)))
                out.append(rule(hub, dia, *ops, when=all_of(when, lambda c: not rope(c))))
    return tuple(out)


HUB = hub_of(TABLE, DIALECTS)


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    hub=HUB,
    dialects={d: _rules(d) for d in DIALECTS},
    normalize=normalize,
    config_from={"gguf": gguf_config.config_from_gguf},
    config_to={"gguf": gguf_config.config_to_gguf},
    variants=lambda p: [
        {**p, "model_type": t, "tie_word_embeddings": tie}
        for t in ("llama", "mistral", "qwen2")
        for tie in (False, True)
    ],
)
