"""BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-RoBERTa) and DistilBERT: hub tensors, dialects.

Hub names are exactly what `save_pretrained` writes for the model class in `architectures`:
the bare encoder (`BertModel`: `embeddings.*`, `encoder.*`, `pooler.*`) or a head model whose
encoder sits under the base-model prefix (`BertForSequenceClassification`: `bert.encoder.*` plus
`classifier.*`). The class decides, from the config alone:

* `base`: the prefix of encoder tensors ("" for the bare model, "bert." / "roberta." /
  "distilbert." for head models), used as `{base}` in name patterns;
* `add_pooling_layer`: whether `pooler.dense.*` exists. True for `BertModel`/`RobertaModel` and
  BERT sequence classification (what transformers builds), False for token classification and
  RoBERTa sequence classification. A bare-model checkpoint saved without its pooler says so
  with `"add_pooling_layer": false` in config.json (transformers ignores the key);
* `head`: which classifier tensors exist ("linear": `classifier.*`; "roberta":
  `classifier.dense.*` + `classifier.out_proj.*`; "distil": `pre_classifier.*` + `classifier.*`),
  with `num_labels` rows (from `id2label`, else `num_labels`, else 2).

RoBERTa's position offset (padding_idx + 1) and its 514-row position table are config facts; the
tensors are BERT's. Layer-norm epsilon stays in the config (HF BERT/RoBERTa 1e-12; DistilBERT
hard-codes 1e-12); dialects that store it (GGUF) carry it across.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimport.arch.ops import Transpose
from slimport.arch.rules import Family, HubTensor, Rule, rule
from slimport.errors import SlimportError


def keras_scope(class_name: str) -> str:
    """Keras' default name for an instance of `class_name` (tf-keras `to_snake_case`).

    HF TF models name their weights `<main layer>/<scope>/<main layer>/...`, where the scope is
    the snake-cased TF class: TFBertModel -> tf_bert_model, TFGPT2LMHeadModel -> tfgp_t2lm_head_model.
    """
    s = re.sub("(.)([A-Z][a-z0-9]+)", r"\1_\2", class_name)
    s = re.sub("([a-z])([A-Z])", r"\1_\2", s).lower()
    return s if s[0] != "_" else "private" + s


@dataclass(frozen=True)
class Arch:
    base: str  # prefix of encoder tensors
    pooler: bool
    head: str | None  # classifier kind, see module docstring


_ARCHS = {
    "BertModel": Arch("", True, None),
    "BertForSequenceClassification": Arch("bert.", True, "linear"),
    "BertForTokenClassification": Arch("bert.", False, "linear"),
    "RobertaModel": Arch("", True, None),
    "RobertaForSequenceClassification": Arch("roberta.", False, "roberta"),
    "RobertaForTokenClassification": Arch("roberta.", False, "linear"),
    "XLMRobertaModel": Arch("", True, None),
    "XLMRobertaForSequenceClassification": Arch("roberta.", False, "roberta"),
    "XLMRobertaForTokenClassification": Arch("roberta.", False, "linear"),
    "DistilBertModel": Arch("", False, None),
    "DistilBertForSequenceClassification": Arch("distilbert.", False, "distil"),
}
_BARE = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
}
# TF main-layer name (the h5 top-level group of the encoder)
_TF_MAIN = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "distilbert": "distilbert",
}


def _architecture(c: dict) -> str:
    bare = _BARE[c["model_type"]]
    archs = c.get("architectures") or [bare]
    arch = archs[0]
    ok = [a for a in _ARCHS if a.startswith(bare.removesuffix("Model"))]
    if arch not in ok:
        raise SlimportError(
            f"config architectures={archs!r}: slimport knows the {c['model_type']} classes "
            + ", ".join(ok),
            hint="set architectures in config.json to the class that saved the checkpoint",
        )
    return arch


def _common(c: dict) -> dict:
    arch = _architecture(c)
    spec = _ARCHS[arch]
    c["architecture"] = arch
    c["base"] = spec.base
    c["add_pooling_layer"] = bool(c.get("add_pooling_layer", spec.pooler))
    c["head"] = spec.head
    labels = c.get("id2label")
    c["num_labels"] = len(labels) if labels else int(c.get("num_labels", 2))
    c["tf_scope"] = keras_scope("TF" + arch)
    c["tf_main"] = _TF_MAIN[c["model_type"]]
    return c


def normalize(cfg: dict) -> dict:
    """Defaults of transformers' BertConfig/RobertaConfig; HF BERT layer_norm_eps is 1e-12."""
    c = dict(cfg)
    c.setdefault("model_type", "bert")
    for key, default in (
        ("vocab_size", 30522), ("hidden_size", 768), ("num_hidden_layers", 12),
        ("num_attention_heads", 12), ("intermediate_size", 3072), ("max_position_embeddings", 512),
        ("type_vocab_size", 2), ("layer_norm_eps", 1e-12), ("hidden_act", "gelu"),
    ):  # fmt: skip
        c.setdefault(key, default)
    return _common(c)


def normalize_distilbert(cfg: dict) -> dict:
    """DistilBertConfig names (dim, n_layers, n_heads, hidden_dim) mapped to the usual keys."""
    c = dict(cfg)
    c.setdefault("model_type", "distilbert")
    for key, default in (
        ("vocab_size", 30522), ("dim", 768), ("n_layers", 6), ("n_heads", 12), ("hidden_dim", 3072),
        ("max_position_embeddings", 512), ("activation", "gelu"),
    ):  # fmt: skip
        c.setdefault(key, default)
    c["hidden_size"], c["num_hidden_layers"] = c["dim"], c["n_layers"]
    c["num_attention_heads"], c["intermediate_size"] = c["n_heads"], c["hidden_dim"]
    c["layer_norm_eps"] = 1e-12  # hard-coded in DistilBERT (torch and TF)
    return _common(c)


def _pruned_heads(c: dict, shapes: dict) -> None:
    """transformers 4's `pruned_heads` ({layer: [removed heads]}, written by structured head
    pruning): that layer's q/k/v rows and attention-output columns are (heads - removed) x head
    size wide."""
    h, width = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    for layer, removed in (c.get("pruned_heads") or {}).items():
        at = f"{c['base']}encoder.layer.{int(layer)}."
        kept = (c["num_attention_heads"] - len(removed)) * width
        for n in ("query", "key", "value"):
            shapes[f"{at}attention.self.{n}.weight"] = (kept, h)
            shapes[f"{at}attention.self.{n}.bias"] = (kept,)
        shapes[f"{at}attention.output.dense.weight"] = (h, kept)


def _pooler(c):
    return c["add_pooling_layer"]


def _head(kind):
    return lambda c: c["head"] == kind


def _heads(c):
    return c["head"] is not None


# ---------------------------------------------------------------- hub tensors
E = "{base}embeddings."
L = "{base}encoder.layer.{layer}."
H = "hidden_size"

# hub suffixes of one encoder layer: (name, out, in) for Linear, (name,) for LayerNorm
_BERT_LINEAR = (
    ("attention.self.query", H, H),
    ("attention.self.key", H, H),
    ("attention.self.value", H, H),
    ("attention.output.dense", H, H),
    ("intermediate.dense", "intermediate_size", H),
    ("output.dense", H, "intermediate_size"),
)
_BERT_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_HEADS = (  # (name, out, in, kind)
    ("classifier", "num_labels", H, "linear"),
    ("classifier.dense", H, H, "roberta"),
    ("classifier.out_proj", "num_labels", H, "roberta"),
    ("pre_classifier", H, H, "distil"),
    ("classifier", "num_labels", H, "distil"),
)


def _linear_hub(name: str, out, inp, when=None) -> list[HubTensor]:
    return [HubTensor(name + ".weight", (out, inp), when), HubTensor(name + ".bias", (out,), when)]


def _norm_hub(name: str, when=None) -> list[HubTensor]:
    return [HubTensor(name + ".weight", (H,), when), HubTensor(name + ".bias", (H,), when)]


def _head_hub(*kinds: str) -> list[HubTensor]:
    return [
        t for n, o, i, kind in _HEADS if kind in kinds for t in _linear_hub(n, o, i, _head(kind))
    ]


BERT_HUB = (
    HubTensor(E + "word_embeddings.weight", ("vocab_size", H)),
    HubTensor(E + "position_embeddings.weight", ("max_position_embeddings", H)),
    HubTensor(E + "token_type_embeddings.weight", ("type_vocab_size", H)),
    *_norm_hub(E + "LayerNorm"),
    *(t for n, o, i in _BERT_LINEAR for t in _linear_hub(L + n, o, i)),
    *(t for n in _BERT_NORMS for t in _norm_hub(L + n)),
    *_linear_hub("{base}pooler.dense", H, H, _pooler),
    *_head_hub("linear", "roberta"),
)

D = "{base}transformer.layer.{layer}."
_DISTIL_LINEAR = (
    ("attention.q_lin", H, H),
    ("attention.k_lin", H, H),
    ("attention.v_lin", H, H),
    ("attention.out_lin", H, H),
    ("ffn.lin1", "intermediate_size", H),
    ("ffn.lin2", H, "intermediate_size"),
)
_DISTIL_NORMS = ("sa_layer_norm", "output_layer_norm")

DISTIL_HUB = (
    HubTensor(E + "word_embeddings.weight", ("vocab_size", H)),
    HubTensor(E + "position_embeddings.weight", ("max_position_embeddings", H)),
    *_norm_hub(E + "LayerNorm"),
    *(t for n, o, i in _DISTIL_LINEAR for t in _linear_hub(D + n, o, i)),
    *(t for n in _DISTIL_NORMS for t in _norm_hub(D + n)),
    *_head_hub("distil"),
)


# ---------------------------------------------------------------- dialects, derived per hub tensor
def _derive(hub: tuple[HubTensor, ...], name_of) -> tuple[Rule, ...]:
    """One rule per hub tensor: `name_of(hub_name)` -> (dialect name, ops)."""
    out = []
    for t in hub:
        dia, ops = name_of(t.name)
        out.append(rule(t.name, dia, *ops, when=t.when))
    return tuple(out)


def _is_norm(name: str) -> bool:
    return "LayerNorm" in name or "layer_norm" in name


def _is_embedding(name: str) -> bool:
    return "embeddings." in name and not _is_norm(name)


def _mindspore_name(name: str):
    """Our MindSpore Cells mirror the HF module tree; nn.LayerNorm says gamma/beta and
    nn.Embedding says embedding_table. nn.Dense keeps weight [out, in] and bias."""
    stem, kind = name.rsplit(".", 1)
    if _is_norm(name):
        return f"{stem}.{'gamma' if kind == 'weight' else 'beta'}", ()
    if _is_embedding(name):
        return f"{stem}.embedding_table", ()
    return name, ()


def _keras_name(name: str):
    """HF TF (TFBertModel & co.) h5 names: `<main>/<scope>/<main>/.../kernel:0`, kernels [in, out].

    Encoder tensors live under the main layer (bert, roberta, distilbert); each head Dense is its
    own top-level layer (`classifier/<scope>/classifier/kernel:0`). Word embeddings are a raw
    `weight`, position/token-type tables Keras `embeddings`, LayerNorm gamma/beta.
    """
    if name.startswith("{base}"):
        top, rest = "{tf_main}", "{tf_main}." + name.removeprefix("{base}")
    else:  # head layers: pre_classifier, classifier (roberta: classifier.dense / .out_proj)
        top, rest = name.split(".", 1)[0], name
    stem, kind = rest.rsplit(".", 1)
    path = stem.replace(".", "/").replace("/{layer}", "_._{layer}")
    prefix = f"{top}/{{tf_scope}}/"
    if _is_norm(name):
        return f"{prefix}{path}/{'gamma' if kind == 'weight' else 'beta'}:0", ()
    if _is_embedding(name):
        return f"{prefix}{path}/{'weight' if 'word_embeddings' in name else 'embeddings'}:0", ()
    if kind == "weight":
        return f"{prefix}{path}/kernel:0", (Transpose(),)
    return f"{prefix}{path}/bias:0", ()


# llama.cpp's BERT names. The pooler (dense + tanh on [CLS]) is llama.cpp's `cls` head, which
# it applies with pooling type RANK; a sequence classifier's output layer is `cls.output`.
# (llama.cpp's own converter drops the pooler; we keep it so BERT -> GGUF -> BERT is exact.)
_GGUF_BERT = {
    E + "word_embeddings": "token_embd",
    E + "token_type_embeddings": "token_types",
    E + "position_embeddings": "position_embd",
    E + "LayerNorm": "token_embd_norm",
    L + "attention.self.query": "blk.{layer}.attn_q",
    L + "attention.self.key": "blk.{layer}.attn_k",
    L + "attention.self.value": "blk.{layer}.attn_v",
    L + "attention.output.dense": "blk.{layer}.attn_output",
    L + "attention.output.LayerNorm": "blk.{layer}.attn_output_norm",
    L + "intermediate.dense": "blk.{layer}.ffn_up",
    L + "output.dense": "blk.{layer}.ffn_down",
    L + "output.LayerNorm": "blk.{layer}.layer_output_norm",
    "{base}pooler.dense": "cls",
    "classifier": "cls.output",
}


def _gguf_name(name: str):
    stem, kind = name.rsplit(".", 1)
    return f"{_GGUF_BERT[stem]}.{kind}", ()


def _seq_cls(c: dict) -> bool:
    return c["architecture"] == "BertForSequenceClassification"


def _gguf_table() -> tuple[Rule, ...]:
    """Only the encoder, pooler and a linear classifier: llama.cpp has no slot for the others
    (from_hub then names the tensor that has no place)."""
    keep = [t for t in BERT_HUB if t.name.rsplit(".", 1)[0] in _GGUF_BERT]
    out = []
    for t in keep:
        dia, ops = _gguf_name(t.name)
        when = t.when
        if t.name.startswith("classifier."):  # a sequence classifier, not a per-token one
            when = _seq_cls
        out.append(rule(t.name, dia, *ops, when=when))
    return tuple(out)


# ---------------------------------------------------------------- GGUF config translation
def config_to_gguf(c: dict) -> dict:
    """HF BERT config -> llama.cpp `bert.*` metadata (as convert_hf_to_gguf.py writes it)."""
    c = normalize(c)
    meta = {
        "general.architecture": "bert",
        "bert.block_count": c["num_hidden_layers"],
        "bert.context_length": c["max_position_embeddings"],
        "bert.embedding_length": c["hidden_size"],
        "bert.feed_forward_length": c["intermediate_size"],
        "bert.attention.head_count": c["num_attention_heads"],
        "bert.attention.layer_norm_epsilon": float(c["layer_norm_eps"]),
        "bert.attention.causal": False,
        "bert.vocab_size": c["vocab_size"],
        "tokenizer.ggml.token_type_count": c["type_vocab_size"],
    }
    if _seq_cls(c):  # pooler + classifier = llama.cpp's RANK head
        meta["bert.pooling_type"] = 4  # llama.cpp LLAMA_POOLING_TYPE_RANK
        labels = c.get("id2label") or {str(i): f"LABEL_{i}" for i in range(c["num_labels"])}
        meta["bert.classifier.output_labels"] = [labels[k] for k in sorted(labels, key=int)]
    return meta


def config_from_gguf(meta: dict) -> dict:
    """llama.cpp `bert.*` metadata (+ `__tensors__`, the tensor names) -> HF BERT config."""
    names = set(meta.get("__tensors__", ()))
    try:
        vocab = meta.get("bert.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        cfg = {
            "model_type": "bert",
            "num_hidden_layers": int(meta["bert.block_count"]),
            "max_position_embeddings": int(meta["bert.context_length"]),
            "hidden_size": int(meta["bert.embedding_length"]),
            "intermediate_size": int(meta["bert.feed_forward_length"]),
            "num_attention_heads": int(meta["bert.attention.head_count"]),
            "layer_norm_eps": float(meta["bert.attention.layer_norm_epsilon"]),
            "vocab_size": int(vocab),
            "type_vocab_size": int(meta.get("tokenizer.ggml.token_type_count", 2)),
            "hidden_act": "gelu",
        }
    except KeyError as e:
        raise SlimportError(f"GGUF metadata lacks {e} needed for a BERT config") from None
    if "tokenizer.ggml.padding_token_id" in meta:
        cfg["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    if "cls.output.weight" in names:
        labels = list(meta.get("bert.classifier.output_labels") or [])
        if not labels:
            raise SlimportError(
                "GGUF has cls.output but no bert.classifier.output_labels: cannot size the classifier"
            )
        cfg["architectures"] = ["BertForSequenceClassification"]
        cfg["id2label"] = {str(i): str(v) for i, v in enumerate(labels)}
        cfg["label2id"] = {str(v): i for i, v in enumerate(labels)}
    else:
        cfg["architectures"] = ["BertModel"]
        if "cls.weight" not in names:
            cfg["add_pooling_layer"] = False
    return cfg


_IGNORABLE = (r"(.*\.)?embeddings\.token_type_ids",)  # a non-persistent buffer some old files hold

BERT_DIALECTS = {
    "mindspore": _derive(BERT_HUB, _mindspore_name),
    "keras": _derive(BERT_HUB, _keras_name),
}


def variants(partial: dict) -> list[dict]:
    """Every class of the config's model types, with and without the pooler (an exporter
    drops the pooler when the graph does not output it)."""
    types = [partial["model_type"]] if "model_type" in partial else list(_BARE)
    return [
        {**partial, "model_type": t, "architectures": [a], "add_pooling_layer": pool}
        for t in types
        for a in _ARCHS
        if a.startswith(_BARE[t].removesuffix("Model"))
        for pool in (True, False)
    ]


def _variants_of(*types: str):
    return lambda partial: [v for v in variants(partial) if v["model_type"] in types]


FAMILY = Family(
    name="bert",
    model_types=("bert",),
    hub=BERT_HUB,
    dialects={**BERT_DIALECTS, "gguf": _gguf_table()},
    normalize=normalize,
    ignorable=_IGNORABLE,
    config_from={"gguf": config_from_gguf},
    config_to={"gguf": config_to_gguf},
    variants=_variants_of("bert"),
    resize=_pruned_heads,
)

# Same tensors as BERT. No GGUF: llama.cpp drops RoBERTa's first padding_idx + 1 position rows,
# so its RoBERTa files are not the HF model's tensors.
ROBERTA = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    hub=BERT_HUB,
    dialects=dict(BERT_DIALECTS),
    normalize=normalize,
    ignorable=_IGNORABLE,
    variants=_variants_of("roberta", "xlm-roberta"),
    resize=_pruned_heads,
)

# No GGUF: llama.cpp writes DistilBERT as a `bert` GGUF without token types, which reads back
# as BERT; a DistilBERT GGUF dialect would need a file-level family marker first.
DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    hub=DISTIL_HUB,
    dialects={
        "mindspore": _derive(DISTIL_HUB, _mindspore_name),
        "keras": _derive(DISTIL_HUB, _keras_name),
    },
    normalize=normalize_distilbert,
)
