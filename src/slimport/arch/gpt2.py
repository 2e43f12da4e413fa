"""GPT-2: hub tensors, dialect tables, GGUF config translation.

Hub = what `GPT2LMHeadModel.save_pretrained` writes: `transformer.wte/wpe/h.{layer}/ln_f`, with
the attention and MLP projections as Conv1D weights laid out [in, out]. `lm_head.weight` is tied
to `transformer.wte.weight` (GPT-2 always ties), so it is absent unless tie_word_embeddings is
false. A bare `GPT2Model` checkpoint (architectures=["GPT2Model"]) has the same tensors without
the `transformer.` prefix (`{base}` below). The causal-mask buffers `attn.bias` and
`attn.masked_bias` of older checkpoints are ignorable. Layer-norm epsilon (HF default 1e-5)
stays in config.json; GGUF carries it as gpt2.attention.layer_norm_epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimport.arch.bert import keras_scope
from slimport.arch.ops import Tie, Transpose, Unsqueeze
from slimport.arch.rules import Family, Kind, Rule, hub_of, rule
from slimport.errors import SlimportError

_BASES = {"GPT2LMHeadModel": "transformer.", "GPT2Model": ""}


def normalize(cfg: dict) -> dict:
    """GPT2Config defaults and the usual key names (hidden_size, num_hidden_layers, ...)."""
    c = dict(cfg)
    c.setdefault("model_type", "gpt2")
    for key, default in (
        ("vocab_size", 50257), ("n_positions", 1024), ("n_embd", 768), ("n_layer", 12), ("n_head", 12),
        ("layer_norm_epsilon", 1e-5), ("activation_function", "gelu_new"), ("tie_word_embeddings", True),
    ):  # fmt: skip
        c.setdefault(key, default)
    c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"] = (
        c["n_embd"],
        c["n_layer"],
        c["n_head"],
    )
    c["intermediate_size"] = c.get("n_inner") or 4 * c["n_embd"]
    c["qkv_size"] = 3 * c["n_embd"]
    arch = (c.get("architectures") or ["GPT2LMHeadModel"])[0]
    if arch not in _BASES:
        raise SlimportError(
            f"config architectures={c.get('architectures')!r}: slimport knows the GPT-2 classes "
            + ", ".join(_BASES),
            hint="set architectures in config.json to the class that saved the checkpoint",
        )
    if arch == "GPT2Model" and not c["tie_word_embeddings"]:
        raise SlimportError(
            "a GPT2Model config with tie_word_embeddings=false has no lm_head to untie"
        )
    c["architecture"], c["base"] = arch, _BASES[arch]
    c["tf_scope"] = keras_scope("TF" + arch)
    return c


def _untied(c: dict) -> bool:
    return not c["tie_word_embeddings"]


def _tied(c: dict) -> bool:
    return bool(c["tie_word_embeddings"])


T = "{base}"
L = "{base}h.{layer}."
H, FF, QKV = "hidden_size", "intermediate_size", "qkv_size"
K = "transformer/{tf_scope}/transformer/"
KL = K + "h_._{layer}/"
B = "blk.{layer}."
DIALECTS = ("mindspore", "keras", "gguf")


@dataclass(frozen=True)
class GPT2Kind(Kind):
    """A row of TABLE (`names` in DIALECTS order). A Conv1D weight is [in, out]: nn.Dense and
    llama.cpp store it [out, in], and TFConv1D stores its bias [1, out]."""

    bias: bool = True
    conv: bool = False

    @property
    def bias_shape(self) -> tuple[int | str, ...]:
        return self.shape[-1:]  # the out dim: last for Conv1D, the only one for LayerNorm


# One row per tensor kind, one column per dialect (as gguf-py's TensorNameMap keeps them).
# MindSpore Cells mirror the HF tree (nn.LayerNorm gamma/beta, nn.Embedding embedding_table).
# HF TF (TFGPT2LMHeadModel / TFGPT2Model, transformers 4.3x-4.57) has one main layer `transformer`
# under the model scope; wte/wpe are Keras Embeddings (`embeddings:0`; files from before 4.35 say
# `wte/weight:0`, which TF renames on load: pass a --mapping for those). llama.cpp
# (convert_hf_to_gguf.py GPT2Model) writes the tied embedding twice, as token_embd and output.
# TF GPT-2 and llama.cpp's always tie, so an untied lm_head has no place there.
# fmt: off
TABLE = (
    #        hub name, shape                          mindspore, keras, gguf
    GPT2Kind(T + "wte.weight", ("vocab_size", H), (
        T + "wte.embedding_table", K + "wte/embeddings:0", "token_embd.weight"), bias=False),
    GPT2Kind(T + "wpe.weight", ("n_positions", H), (
        T + "wpe.embedding_table", K + "wpe/embeddings:0", "position_embd.weight"), bias=False),
    GPT2Kind(L + "ln_1.weight", (H,), (L + "ln_1.gamma", KL + "ln_1/gamma:0", B + "attn_norm.weight")),
    GPT2Kind(L + "ln_2.weight", (H,), (L + "ln_2.gamma", KL + "ln_2/gamma:0", B + "ffn_norm.weight")),
    GPT2Kind(L + "attn.c_attn.weight", (H, QKV), (
        L + "attn.c_attn.weight", KL + "attn/c_attn/weight:0", B + "attn_qkv.weight"), conv=True),
    GPT2Kind(L + "attn.c_proj.weight", (H, H), (
        L + "attn.c_proj.weight", KL + "attn/c_proj/weight:0", B + "attn_output.weight"), conv=True),
    GPT2Kind(L + "mlp.c_fc.weight", (H, FF), (
        L + "mlp.c_fc.weight", KL + "mlp/c_fc/weight:0", B + "ffn_up.weight"), conv=True),
    GPT2Kind(L + "mlp.c_proj.weight", (FF, H), (
        L + "mlp.c_proj.weight", KL + "mlp/c_proj/weight:0", B + "ffn_down.weight"), conv=True),
    GPT2Kind(T + "ln_f.weight", (H,), (T + "ln_f.gamma", K + "ln_f/gamma:0", "output_norm.weight")),
    GPT2Kind("lm_head.weight", ("vocab_size", H), ("lm_head.weight", None, None),
             bias=False, when=_untied),
)
# fmt: on
# the dialect that stores a tied embedding twice -> the name of the copy (the Tie op checks that
# both copies agree when reading)
_TIED_COPY = {"gguf": "output.weight"}


def _rules(dialect: str) -> tuple[Rule, ...]:
    """The dialect's column of TABLE as rules: weight then bias of each kind, in table order."""
    col, keras = DIALECTS.index(dialect), dialect == "keras"
    out = []
    for k in TABLE:
        name = k.names[col]
        if name is None:
            continue
        if k.hub == T + "wte.weight" and dialect in _TIED_COPY:
            out.append(rule(k.hub, (name, _TIED_COPY[dialect]), Tie(), when=_tied))
            out.append(rule(k.hub, name, when=_untied))
            continue
        for hub, dia, when, is_bias in k.tensors(col):
            ops = (Transpose(),) if k.conv and not is_bias and not keras else ()
            ops += (Unsqueeze(0),) if k.conv and is_bias and keras else ()
            out.append(rule(hub, dia, *ops, when=when))
    return tuple(out)


HUB = hub_of(TABLE, DIALECTS)


def config_to_gguf(cfg: dict) -> dict:
    """HF GPT-2 config -> llama.cpp `gpt2.*` metadata."""
    c = normalize(cfg)
    return {
        "general.architecture": "gpt2",
        "gpt2.block_count": c["n_layer"],
        "gpt2.context_length": c["n_positions"],
        "gpt2.embedding_length": c["n_embd"],
        "gpt2.feed_forward_length": c["intermediate_size"],
        "gpt2.attention.head_count": c["n_head"],
        "gpt2.attention.layer_norm_epsilon": float(c["layer_norm_epsilon"]),
        "gpt2.vocab_size": c["vocab_size"],
    }


def config_from_gguf(meta: dict) -> dict:
    """llama.cpp `gpt2.*` metadata -> HF GPT2LMHeadModel config.

    llama.cpp's converter always writes `output.weight` as a copy of the embedding, so the
    model is read as tied; the Tie op then checks the two copies really are equal.
    """
    try:
        vocab = meta.get("gpt2.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        n_embd = int(meta["gpt2.embedding_length"])
        ff = int(meta["gpt2.feed_forward_length"])
        cfg = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": int(meta["gpt2.block_count"]),
            "n_positions": int(meta["gpt2.context_length"]),
            "n_embd": n_embd,
            "n_inner": None if ff == 4 * n_embd else ff,
            "n_head": int(meta["gpt2.attention.head_count"]),
            "layer_norm_epsilon": float(meta["gpt2.attention.layer_norm_epsilon"]),
            "vocab_size": int(vocab),
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    except KeyError as e:
        raise SlimportError(f"GGUF metadata lacks {e} needed for a GPT-2 config") from None
    for key, hf in (
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ):
        if key in meta:
            cfg[hf] = int(meta[key])
    return cfg


# the usual config keys (what a graph shows) -> GPT2Config's own names
_OWN_KEYS = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "intermediate_size": "n_inner",
             "layer_norm_eps": "layer_norm_epsilon", "hidden_act": "activation_function"}  # fmt: skip


def variants(partial: dict) -> list[dict]:
    """Both classes, tied or not, with the usual keys renamed to GPT2Config's."""
    own = {_OWN_KEYS.get(k, k): v for k, v in partial.items() if k != "num_key_value_heads"}
    return [
        {**own, "model_type": "gpt2", "architectures": [a], "tie_word_embeddings": tie}
        for a in _BASES
        for tie in (True, False)
        if tie or a != "GPT2Model"
    ]


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    hub=HUB,
    dialects={d: _rules(d) for d in DIALECTS},
    normalize=normalize,
    ignorable=(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",),
    config_from={"gguf": config_from_gguf},
    config_to={"gguf": config_to_gguf},
    variants=variants,
    stored_in_out=tuple(k.hub for k in TABLE if k.conv),
)
