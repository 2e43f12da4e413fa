"""Llama family (Llama, Mistral, Qwen2, SmolLM): hub tensors, dialect tables, config translation."""

from __future__ import annotations

from slimport.arch import gguf_config
from slimport.arch.ops import At, PermuteRope, Tie, Transpose
from slimport.arch.rules import Family, HubTensor, renames, rule

L = "model.layers.{layer}."


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


def _qkv_bias(c):
    return c["qkv_bias"]


def _o_bias(c):
    return c["o_bias"]


def _mlp_bias(c):
    return c["mlp_bias"]


def _rope_permuted_in_gguf(c):
    return c["model_type"] != "qwen2"  # llama.cpp runs Qwen2 with NEOX (rotate-half) RoPE


HUB = (
    HubTensor("model.embed_tokens.weight", ("vocab_size", "hidden_size")),
    HubTensor(L + "input_layernorm.weight", ("hidden_size",)),
    HubTensor(L + "self_attn.q_proj.weight", ("q_dim", "hidden_size")),
    HubTensor(L + "self_attn.k_proj.weight", ("kv_dim", "hidden_size")),
    HubTensor(L + "self_attn.v_proj.weight", ("kv_dim", "hidden_size")),
    HubTensor(L + "self_attn.o_proj.weight", ("hidden_size", "q_dim")),
    HubTensor(L + "self_attn.q_proj.bias", ("q_dim",), _qkv_bias),
    HubTensor(L + "self_attn.k_proj.bias", ("kv_dim",), _qkv_bias),
    HubTensor(L + "self_attn.v_proj.bias", ("kv_dim",), _qkv_bias),
    HubTensor(L + "self_attn.o_proj.bias", ("hidden_size",), _o_bias),
    HubTensor(L + "post_attention_layernorm.weight", ("hidden_size",)),
    HubTensor(L + "mlp.gate_proj.weight", ("intermediate_size", "hidden_size")),
    HubTensor(L + "mlp.up_proj.weight", ("intermediate_size", "hidden_size")),
    HubTensor(L + "mlp.down_proj.weight", ("hidden_size", "intermediate_size")),
    HubTensor(L + "mlp.gate_proj.bias", ("intermediate_size",), _mlp_bias),
    HubTensor(L + "mlp.up_proj.bias", ("intermediate_size",), _mlp_bias),
    HubTensor(L + "mlp.down_proj.bias", ("hidden_size",), _mlp_bias),
    HubTensor("model.norm.weight", ("hidden_size",)),
    HubTensor("lm_head.weight", ("vocab_size", "hidden_size"), lambda c: not _tied(c)),
)


_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
# The same projections as Meta / llama2.c / MindFormers and as llama.cpp name them
_META_PROJ = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
              "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # fmt: skip
_GGUF_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_ROPE_HEADS = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


def _all(*conds):
    conds = [c for c in conds if c is not None]
    return (lambda c: all(f(c) for f in conds)) if conds else None


def _bias_rule(suffix: str):
    """When a projection has a bias: MLP biases, o_proj bias and q/k/v biases vary separately."""
    return _mlp_bias if suffix.startswith("mlp.") else _o_bias if "o_proj" in suffix else _qkv_bias


def _projections(targets: tuple[str, ...], rope=None) -> list:
    """Rules for the seven projections (+ biases): `targets` are the dialect names, in _PROJ order.

    `rope(cfg)` says when q/k rows are stored interleaved (PermuteRope) in this dialect.
    """
    rules = []
    for suffix, target in zip(_PROJ, targets, strict=True):
        for kind, when in (("weight", None), ("bias", _bias_rule(suffix))):
            hub, dia = f"{L}{suffix}.{kind}", f"{target}.{kind}"
            heads = _ROPE_HEADS.get(suffix)
            if rope is None or heads is None:
                rules.append(rule(hub, dia, when=when))
            else:
                rules.append(rule(hub, dia, PermuteRope(heads), when=_all(when, rope)))
                rules.append(rule(hub, dia, when=_all(when, lambda c: not rope(c))))
    return rules


# MindSpore: our Cells mirror the HF module tree; nn.Embedding calls its weight embedding_table.
MINDSPORE = (
    rule("model.embed_tokens.weight", "model.embed_tokens.embedding_table"),
    *renames({L + n: L + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}),
    *_projections(tuple(L + p for p in _PROJ)),
    rule("model.norm.weight", "model.norm.weight"),
    rule("lm_head.weight", "lm_head.weight", when=lambda c: not _tied(c)),
)

# MindFormers' own HF->MindSpore weight converter names (no RoPE permutation: it keeps HF rows).
_MF = "model.layers.{layer}."
MINDFORMERS = (
    rule("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    rule(L + "input_layernorm.weight", _MF + "attention_norm.weight"),
    rule(L + "post_attention_layernorm.weight", _MF + "ffn_norm.weight"),
    *_projections(tuple(_MF + n for n in _META_PROJ)),
    rule("model.norm.weight", "model.norm_out.weight"),
    rule("lm_head.weight", "lm_head.weight", when=lambda c: not _tied(c)),
)

# llama.cpp names; q/k rows interleaved for RoPE (except Qwen2, which llama.cpp runs NEOX-style).
_B = "blk.{layer}."
GGUF = (
    rule("model.embed_tokens.weight", "token_embd.weight"),
    rule(L + "input_layernorm.weight", _B + "attn_norm.weight"),
    rule(L + "post_attention_layernorm.weight", _B + "ffn_norm.weight"),
    *_projections(tuple(_B + n for n in _GGUF_PROJ), rope=_rope_permuted_in_gguf),
    rule("model.norm.weight", "output_norm.weight"),
    rule("lm_head.weight", "output.weight", when=lambda c: not _tied(c)),
)

# llama2.c (Karpathy's model.py names); q/k rows interleaved like Meta's checkpoints.
_C = "layers.{layer}."
LLAMA2C = (
    rule("model.embed_tokens.weight", "tok_embeddings.weight"),
    rule(L + "input_layernorm.weight", _C + "attention_norm.weight"),
    rule(L + "post_attention_layernorm.weight", _C + "ffn_norm.weight"),
    *_projections(tuple(_C + n for n in _META_PROJ), rope=lambda c: True),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "output.weight", when=lambda c: not _tied(c)),
)


def _keras() -> tuple:
    """HF TF names of TFMistralForCausalLM (transformers' only TF model of this family): main
    layer `model`, decoder layers named `layers.N`, Dense kernels [in, out], RMSNorm `weight`,
    embed_tokens a Keras Embedding. TF Mistral has no biases and never ties: q/k/v/o/mlp biases
    (Qwen2, attention_bias) keep Keras' `bias:0` names, and a tied embedding is also written as
    the lm_head kernel (Tie; the inverse checks that both copies agree)."""
    m = "model/tf_mistral_for_causal_lm/model/"
    emb, head = m + "embed_tokens/embeddings:0", "lm_head/tf_mistral_for_causal_lm/lm_head/kernel:0"
    lay = m + "layers.{layer}/"
    rules = [
        rule("model.embed_tokens.weight", (emb, head), Tie(), At(1, Transpose()), when=_tied),
        rule("model.embed_tokens.weight", emb, when=lambda c: not _tied(c)),
        rule(L + "input_layernorm.weight", lay + "input_layernorm/weight:0"),
        rule(L + "post_attention_layernorm.weight", lay + "post_attention_layernorm/weight:0"),
    ]
    for p in _PROJ:
        tf = lay + p.replace(".", "/")
        rules.append(rule(f"{L}{p}.weight", tf + "/kernel:0", Transpose()))
        rules.append(rule(f"{L}{p}.bias", tf + "/bias:0", when=_bias_rule(p)))
    rules.append(rule("model.norm.weight", m + "norm/weight:0"))
    rules.append(rule("lm_head.weight", head, Transpose(), when=lambda c: not _tied(c)))
    return tuple(rules)


KERAS = _keras()


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    hub=HUB,
    dialects={
        "mindspore": MINDSPORE,
        "mindformers": MINDFORMERS,
        "gguf": GGUF,
        "llama2c": LLAMA2C,
        "keras": KERAS,
    },
    normalize=normalize,
    config_from={"gguf": gguf_config.config_from_gguf},
    config_to={"gguf": gguf_config.config_to_gguf},
)
