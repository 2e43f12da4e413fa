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

from slimport.arch.bert import keras_scope
from slimport.arch.ops import Tie, Transpose, Unsqueeze
from slimport.arch.rules import Family, HubTensor, rule
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

_CONV1D = (  # (hub stem, in, out): Conv1D weights are [in, out]
    ("attn.c_attn", H, QKV),
    ("attn.c_proj", H, H),
    ("mlp.c_fc", H, FF),
    ("mlp.c_proj", FF, H),
)
_NORMS = ("ln_1", "ln_2")

HUB = (
    HubTensor(T + "wte.weight", ("vocab_size", H)),
    HubTensor(T + "wpe.weight", ("n_positions", H)),
    *(HubTensor(f"{L}{n}.{k}", (H,)) for n in _NORMS for k in ("weight", "bias")),
    *(
        t
        for n, i, o in _CONV1D
        for t in (HubTensor(f"{L}{n}.weight", (i, o)), HubTensor(f"{L}{n}.bias", (o,)))
    ),
    HubTensor(T + "ln_f.weight", (H,)),
    HubTensor(T + "ln_f.bias", (H,)),
    HubTensor("lm_head.weight", ("vocab_size", H), _untied),
)


def _layer_rules(norm, conv) -> list:
    """Per-layer rules from `norm(stem, kind)` and `conv(stem, kind)` -> (name, ops)."""
    out = []
    for n in _NORMS:
        for k in ("weight", "bias"):
            name, ops = norm(L + n, k)
            out.append(rule(f"{L}{n}.{k}", name, *ops))
    for n, _, _ in _CONV1D:
        for k in ("weight", "bias"):
            name, ops = conv(L + n, k)
            out.append(rule(f"{L}{n}.{k}", name, *ops))
    return out


# MindSpore Cells mirroring the HF tree: nn.Dense weights are [out, in] (Conv1D transposed),
# nn.LayerNorm gamma/beta, nn.Embedding embedding_table.
MINDSPORE = (
    rule(T + "wte.weight", T + "wte.embedding_table"),
    rule(T + "wpe.weight", T + "wpe.embedding_table"),
    *_layer_rules(
        lambda s, k: (f"{s}.{'gamma' if k == 'weight' else 'beta'}", ()),
        lambda s, k: (f"{s}.{k}", (Transpose(),) if k == "weight" else ()),
    ),
    rule(T + "ln_f.weight", T + "ln_f.gamma"),
    rule(T + "ln_f.bias", T + "ln_f.beta"),
    rule("lm_head.weight", "lm_head.weight", when=_untied),
)

# HF TF (TFGPT2LMHeadModel / TFGPT2Model, transformers 4.3x-4.57): one main layer `transformer`
# under the model scope; TFConv1D keeps weight [in, out] and stores its bias as [1, out]; wte and
# wpe are Keras Embeddings (`embeddings:0`; files from before 4.35 say `wte/weight:0`, which
# TF itself renames on load; pass a --mapping for those). TF GPT-2 always ties: no lm_head.
_K = "transformer/{tf_scope}/transformer/"
_KL = _K + "h_._{layer}/"
KERAS = (
    rule(T + "wte.weight", _K + "wte/embeddings:0"),
    rule(T + "wpe.weight", _K + "wpe/embeddings:0"),
    *_layer_rules(
        lambda s, k: (
            _KL + s.rsplit(".", 1)[-1] + f"/{'gamma' if k == 'weight' else 'beta'}:0",
            (),
        ),
        lambda s, k: (
            _KL + s.split("}.", 1)[1].replace(".", "/") + f"/{k}:0",
            () if k == "weight" else (Unsqueeze(0),),
        ),
    ),
    rule(T + "ln_f.weight", _K + "ln_f/gamma:0"),
    rule(T + "ln_f.bias", _K + "ln_f/beta:0"),
)

# llama.cpp (convert_hf_to_gguf.py GPT2Model): Conv1D weights transposed to [out, in]; the tied
# embedding is written twice, as token_embd and output (Tie; the inverse checks both are equal).
# llama.cpp's GPT-2 is always tied, so an untied lm_head has no place here (from_hub says so).
_B = "blk.{layer}."
_GGUF_NAMES = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
GGUF = (
    rule(T + "wte.weight", ("token_embd.weight", "output.weight"), Tie(), when=_tied),
    rule(T + "wte.weight", "token_embd.weight", when=_untied),
    rule(T + "wpe.weight", "position_embd.weight"),
    *_layer_rules(
        lambda s, k: (f"{_B}{_GGUF_NAMES[s.split('}.', 1)[1]]}.{k}", ()),
        lambda s, k: (
            f"{_B}{_GGUF_NAMES[s.split('}.', 1)[1]]}.{k}",
            (Transpose(),) if k == "weight" else (),
        ),
    ),
    rule(T + "ln_f.weight", "output_norm.weight"),
    rule(T + "ln_f.bias", "output_norm.bias"),
)


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


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    hub=HUB,
    dialects={"mindspore": MINDSPORE, "keras": KERAS, "gguf": GGUF},
    normalize=normalize,
    ignorable=(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",),
    config_from={"gguf": config_from_gguf},
    config_to={"gguf": config_to_gguf},
)
