"""BERT-style encoders in MindSpore: BERT/MiniLM and RoBERTa/XLM-R (DistilBERT in distilbert.py,
on the pieces here), bare and with a sequence-classification head, matching transformers' numerics (fp32, inference: no dropout).

Cells mirror the transformers module tree, so parameter names are the `mindspore` dialect of
arch/bert.py (`embeddings.LayerNorm.gamma`, `encoder.layer.0.attention.self.query.weight`, ...),
with the `bert.` / `roberta.` / `distilbert.` prefix in head models. A head model loads a bare
encoder checkpoint (MiniLM) the transformers way: encoder tensors re-prefixed, the classifier newly
initialised (normal(0, initializer_range), zero bias) and listed in the load report; a head
checkpoint loads into the bare model with its head tensors dropped and reported.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal

from slimport.arch import bert as arch
from slimport.convert import engine
from slimport.convert.loader import Model
from slimport.errors import SlimportError, name_list
from slimport.runtime.mindspore.base import PreTrainedCell


# ---------------------------------------------------------------- shared pieces
def mask_min(dtype) -> float:
    """The additive value of a masked position: the dtype's lowest float, as transformers uses."""
    if dtype == ms.float16:
        return -65504.0
    if dtype == ms.bfloat16:
        return -3.3895313892515355e38
    return -3.4028234663852886e38


def extended_mask(attention_mask, dtype):
    """[batch, seq] of 1 (attend) / 0 (padding) -> additive [batch, 1, 1, seq] in `dtype`."""
    keep = attention_mask.astype(dtype)
    return ((1.0 - keep) * mask_min(dtype)).reshape(keep.shape[0], 1, 1, keep.shape[1])


def gelu_exact(x):
    return ops.gelu(x, approximate="none")


def gelu_tanh(x):
    return ops.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": ops.relu,
    "silu": ops.silu,
    "swish": ops.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise SlimportError(
            f"activation {name!r} is not supported by slimport's MindSpore models",
            hint="supported: " + ", ".join(ACTIVATIONS),
        )
    return ACTIVATIONS[name]


def dense(n_in: int, n_out: int, sigma: float | None = None) -> nn.Dense:
    """nn.Dense [out, in] like torch; `sigma`: transformers' head init normal(0, sigma), zero bias."""
    if sigma is None:  # loaded from the checkpoint: skip the cost of a random init
        return nn.Dense(n_in, n_out, weight_init="zeros")
    return nn.Dense(n_in, n_out, weight_init=Normal(sigma), bias_init="zeros")


def layer_norm(cfg: dict) -> nn.LayerNorm:
    # MindSpore's default epsilon is 1e-7: always pass the checkpoint's (HF BERT 1e-12)
    return nn.LayerNorm((cfg["hidden_size"],), epsilon=float(cfg["layer_norm_eps"]))


class SelfAttention(nn.Cell):
    """Multi-head scaled dot-product attention over one sequence (q/k/v/out projections named
    by the caller, since BERT and DistilBERT name them differently)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_heads = int(cfg["num_attention_heads"])
        self.head_dim = int(cfg["hidden_size"]) // self.n_heads
        self.scaling = float(self.head_dim**-0.5)

    def heads(self, x):
        b, s, _ = x.shape
        return x.reshape(b, s, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def attend(self, q, k, v, mask):
        scores = ops.matmul(self.heads(q), self.heads(k).swapaxes(-1, -2)) * self.scaling
        if mask is not None:
            scores = scores + mask
        ctx = ops.matmul(ops.softmax(scores, axis=-1), self.heads(v))
        b, _, s, _ = ctx.shape
        return ctx.transpose(0, 2, 1, 3).reshape(b, s, self.n_heads * self.head_dim)


# ---------------------------------------------------------------- BERT / RoBERTa
class BertEmbeddings(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], h, embedding_table="zeros")
        self.position_embeddings = nn.Embedding(
            cfg["max_position_embeddings"], h, embedding_table="zeros"
        )
        self.token_type_embeddings = nn.Embedding(
            cfg["type_vocab_size"], h, embedding_table="zeros"
        )
        self.LayerNorm = layer_norm(cfg)
        # RoBERTa numbers positions from padding_idx + 1, skipping padding tokens
        self.roberta = cfg["model_type"] in arch.ROBERTA.model_types
        self.padding_idx = int(cfg.get("pad_token_id", 1) or 0)

    def construct(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            if self.roberta:  # transformers' create_position_ids_from_input_ids
                keep = (input_ids != self.padding_idx).astype(ms.int32)
                position_ids = ops.cumsum(keep, axis=1) * keep + self.padding_idx
            else:
                position_ids = ops.arange(0, input_ids.shape[1], dtype=ms.int32).reshape(1, -1)
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.LayerNorm(x)


class BertSelf(SelfAttention):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        h = cfg["hidden_size"]
        self.query, self.key, self.value = dense(h, h), dense(h, h), dense(h, h)

    def construct(self, x, mask):
        return self.attend(self.query(x), self.key(x), self.value(x), mask)


class BertSubOutput(nn.Cell):
    """dense, then LayerNorm of (dense output + residual): BertSelfOutput and BertOutput."""

    def __init__(self, cfg: dict, n_in: int):
        super().__init__()
        self.dense = dense(n_in, cfg["hidden_size"])
        self.LayerNorm = layer_norm(cfg)

    def construct(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self = BertSelf(cfg)
        self.output = BertSubOutput(cfg, cfg["hidden_size"])

    def construct(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = dense(cfg["hidden_size"], cfg["intermediate_size"])
        self.act = activation(cfg["hidden_act"])

    def construct(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSubOutput(cfg, cfg["intermediate_size"])

    def construct(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class LayerStack(nn.Cell):
    """`num_hidden_layers` blocks in a `layer` list (the checkpoint's name), run in order; returns
    the last state and every state from the embeddings on."""

    def __init__(self, block: type, cfg: dict):
        super().__init__()
        self.layer = nn.CellList([block(cfg) for _ in range(cfg["num_hidden_layers"])])

    def construct(self, x, mask):
        states = (x,)
        for block in self.layer:
            x = block(x, mask)
            states = states + (x,)
        return x, states


class BertPooler(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = dense(cfg["hidden_size"], cfg["hidden_size"], _sigma(cfg))

    def construct(self, x):
        return ops.tanh(self.dense(x[:, 0]))


def _sigma(cfg: dict) -> float:
    return float(cfg.get("initializer_range", 0.02))


def _check_bert_config(cfg: dict) -> None:
    kind = cfg.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise SlimportError(
            f"position_embedding_type={kind!r} is not supported (transformers 5 dropped it too)",
            hint="only absolute position embeddings are implemented",
        )


class _BertBody(nn.Cell):
    """The encoder of BERT-style models: embeddings, layers, optional pooler.

    Used as `bert.`/`roberta.` inside head models; BertModel holds the same sub-cells itself so
    its parameter names carry no prefix.
    """

    def __init__(self, cfg: dict, pooler: bool):
        super().__init__()
        _build_body(self, cfg, pooler)

    def construct(self, input_ids, attention_mask, token_type_ids, position_ids):
        return _encode(self, input_ids, attention_mask, token_type_ids, position_ids)


def _build_body(cell: nn.Cell, cfg: dict, pooler: bool) -> None:
    _check_bert_config(cfg)
    cell.embeddings = BertEmbeddings(cfg)
    cell.encoder = LayerStack(BertLayer, cfg)
    cell.has_pooler = pooler
    if pooler:
        cell.pooler = BertPooler(cfg)


def _encode(cell, input_ids, attention_mask, token_type_ids, position_ids):
    """(last hidden state, pooled [CLS] or the last hidden state again, all hidden states)."""
    x = cell.embeddings(input_ids, token_type_ids, position_ids)
    mask = None
    if attention_mask is not None:
        mask = extended_mask(attention_mask, x.dtype)
    last, states = cell.encoder(x, mask)
    pooled = last
    if cell.has_pooler:
        pooled = cell.pooler(last)
    return last, pooled, states


# ---------------------------------------------------------------- loading helpers
def rebase(model: Model, cell: PreTrainedCell, base: str) -> list[engine.Planned]:
    """The checkpoint's tensors under this class' base prefix (transformers' base-model prefix
    handling): encoder tensors re-prefixed from the checkpoint's base to `base`, tensors this
    class has no parameter for (another head, a pooler) dropped, reported and warned about."""
    planned = engine.from_hub(model.hub, model.family, "mindspore", model.cfg)
    src = model.cfg["base"]
    own = {p.name for p in cell.get_parameters()}
    out, dropped = [], []
    for t in planned:
        head = src and not t.name.startswith(src)  # a head tensor of the checkpoint's class
        name = t.name if head else base + t.name.removeprefix(src)
        if name not in own and src != base:
            dropped.append(t.name)
            continue
        t.name = name
        out.append(t)
    if dropped:
        note = f"not used by {type(cell).__name__}: {name_list(dropped)}"
        if note not in model.notes:  # plan_parameters runs again for an override's twin
            model.notes.append(note)
            model.ignored.extend(dropped)
            warnings.warn(
                f"{model.source.path} is a {model.cfg['architecture']} checkpoint: "
                f"{type(cell).__name__} does not use {name_list(dropped)}",
                stacklevel=5,
            )
    return out


class _BertFamilyCell(PreTrainedCell):
    """Shared loading logic of the BERT-style classes."""

    family: ClassVar[str] = arch.FAMILY.name
    base_prefix: ClassVar[str] = ""  # where the encoder lives in this class
    head_kind: ClassVar[str | None] = None  # arch.bert `head` kinds: linear, roberta, distil
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, config: dict):
        config = dict(config)
        # save_pretrained writes this class' own tree: say so, so the saved folder reloads as it
        config["architectures"] = [self.architectures[0]]
        super().__init__(config)

    def plan_parameters(self, model: Model) -> list[engine.Planned]:
        return rebase(model, self, self.base_prefix)

    def newly_initialized(self, model: Model) -> set[str]:
        """A head the checkpoint's class does not have (a bare MiniLM into a classifier), or a
        pooler a checkpoint saved without: initialised like transformers, listed in the report."""
        new = set()
        if self.head_kind is not None and model.cfg["head"] != self.head_kind:
            new |= {
                p.name for p in self.get_parameters() if not p.name.startswith(self.base_prefix)
            }
        if not model.cfg["add_pooling_layer"]:
            new |= {p.name for p in self.get_parameters() if ".pooler." in "." + p.name}
        return new

    def hf_config_keys(self) -> set[str]:
        keys = super().hf_config_keys()
        if not self.config.get("add_pooling_layer", True):  # a bare model saved without pooler
            keys.add("add_pooling_layer")
        return keys


class BertModel(_BertFamilyCell):
    """transformers' BertModel (also MiniLM): outputs last_hidden_state, pooler_output (when the
    checkpoint has a pooler) and, on request, hidden_states (embeddings, then every layer)."""

    architectures = ("BertModel",)

    def __init__(self, config: dict):
        super().__init__(config)
        pooler = bool(config.get("add_pooling_layer", True))
        _build_body(self, config, pooler)
        self.config["add_pooling_layer"] = pooler
        self.output_hidden_states = False
        names = ("last_hidden_state", "pooler_output") if pooler else ("last_hidden_state",)
        self.output_names = (*names, "hidden_states")

    def construct(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=None,
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        last, pooled, states = _encode(
            self, input_ids, attention_mask, token_type_ids, position_ids
        )
        out = (last, pooled) if self.has_pooler else (last,)
        if want:
            return out + (states,)
        return out


class RobertaModel(BertModel):
    family = arch.ROBERTA.name
    architectures = ("RobertaModel",)

    def __init__(self, config: dict):
        super().__init__(config)
        if self.config["model_type"] == "xlm-roberta":  # same tensors, its own class name
            self.config["architectures"] = ["XLMRobertaModel"]


class _SequenceClassifier(_BertFamilyCell):
    """Shared construct of the BERT-body classifiers; subclasses say how `classify` reads the
    body (their body attribute keeps the checkpoint's prefix: `bert`, `roberta`)."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.output_hidden_states = False
        self.output_names = ("logits", "hidden_states")

    def construct(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=None,
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        logits, states = self.classify(input_ids, attention_mask, token_type_ids, position_ids)
        if want:
            return logits, states
        return (logits,)


class BertForSequenceClassification(_SequenceClassifier):
    """Pooled [CLS] -> (dropout: inactive) -> classifier; outputs logits (+ hidden_states)."""

    architectures = ("BertForSequenceClassification",)
    base_prefix = "bert."
    head_kind = "linear"

    def __init__(self, config: dict):
        super().__init__(config)
        self.config["add_pooling_layer"] = True
        self.bert = _BertBody(config, pooler=True)
        self.classifier = dense(config["hidden_size"], int(config["num_labels"]), _sigma(config))

    def classify(self, input_ids, attention_mask, token_type_ids, position_ids):
        _, pooled, states = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return self.classifier(pooled), states


class RobertaClassificationHead(nn.Cell):
    """[CLS] (the <s> token) -> dense -> tanh -> out_proj, as transformers' RoBERTa head."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = dense(cfg["hidden_size"], cfg["hidden_size"], _sigma(cfg))
        self.out_proj = dense(cfg["hidden_size"], int(cfg["num_labels"]), _sigma(cfg))

    def construct(self, x):
        return self.out_proj(ops.tanh(self.dense(x[:, 0])))


class RobertaForSequenceClassification(_SequenceClassifier):
    family = arch.ROBERTA.name
    architectures = ("RobertaForSequenceClassification",)
    base_prefix = "roberta."
    head_kind = "roberta"

    def __init__(self, config: dict):
        super().__init__(config)
        if self.config["model_type"] == "xlm-roberta":
            self.config["architectures"] = ["XLMRobertaForSequenceClassification"]
        self.config["add_pooling_layer"] = False
        self.roberta = _BertBody(config, pooler=False)
        self.classifier = RobertaClassificationHead(config)

    def classify(self, input_ids, attention_mask, token_type_ids, position_ids):
        last, _, states = self.roberta(input_ids, attention_mask, token_type_ids, position_ids)
        return self.classifier(last), states
