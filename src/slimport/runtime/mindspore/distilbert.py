"""DistilBERT in MindSpore, bare and with a sequence-classification head, on the shared encoder
pieces of bert.py (parameter names: the `mindspore` dialect of arch/bert.py, `distilbert.` prefix
in the head model)."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from slimport.arch import bert as arch
from slimport.runtime.mindspore.bert import (
    LayerStack,
    SelfAttention,
    _BertFamilyCell,
    _sigma,
    activation,
    dense,
    extended_mask,
    layer_norm,
)


class DistilEmbeddings(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], h, embedding_table="zeros")
        self.position_embeddings = nn.Embedding(
            cfg["max_position_embeddings"], h, embedding_table="zeros"
        )
        self.LayerNorm = layer_norm(cfg)

    def construct(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = ops.arange(0, input_ids.shape[1], dtype=ms.int32).reshape(1, -1)
        return self.LayerNorm(
            self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        )


class DistilAttention(SelfAttention):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        h = cfg["hidden_size"]
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (dense(h, h) for _ in range(4))

    def construct(self, x, mask):
        return self.out_lin(self.attend(self.q_lin(x), self.k_lin(x), self.v_lin(x), mask))


class DistilFFN(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.lin1 = dense(cfg["hidden_size"], cfg["intermediate_size"])
        self.lin2 = dense(cfg["intermediate_size"], cfg["hidden_size"])
        self.act = activation(cfg["activation"])

    def construct(self, x):
        return self.lin2(self.act(self.lin1(x)))


class DistilBlock(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = DistilAttention(cfg)
        self.sa_layer_norm = layer_norm(cfg)
        self.ffn = DistilFFN(cfg)
        self.output_layer_norm = layer_norm(cfg)

    def construct(self, x, mask):
        a = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(a) + a)


def _build_distil(cell: nn.Cell, cfg: dict) -> None:
    cell.embeddings = DistilEmbeddings(cfg)
    cell.transformer = LayerStack(DistilBlock, cfg)


def _encode_distil(cell, input_ids, attention_mask, position_ids):
    x = cell.embeddings(input_ids, position_ids)
    mask = None
    if attention_mask is not None:
        mask = extended_mask(attention_mask, x.dtype)
    return cell.transformer(x, mask)


class _DistilBody(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        _build_distil(self, cfg)

    def construct(self, input_ids, attention_mask, position_ids):
        return _encode_distil(self, input_ids, attention_mask, position_ids)


class DistilBertModel(_BertFamilyCell):
    """transformers' DistilBertModel: last_hidden_state (+ hidden_states); no pooler."""

    family = arch.DISTILBERT.name
    architectures = ("DistilBertModel",)

    def __init__(self, config: dict):
        super().__init__(config)
        _build_distil(self, config)
        self.output_hidden_states = False
        self.output_names = ("last_hidden_state", "hidden_states")

    def construct(
        self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        last, states = _encode_distil(self, input_ids, attention_mask, position_ids)
        if want:
            return last, states
        return (last,)

    def hf_config_keys(self) -> set[str]:
        return super().hf_config_keys() - {"add_pooling_layer"}


class DistilBertForSequenceClassification(_BertFamilyCell):
    """[CLS] -> pre_classifier -> ReLU -> (dropout: inactive) -> classifier; outputs logits."""

    family = arch.DISTILBERT.name
    architectures = ("DistilBertForSequenceClassification",)
    base_prefix = "distilbert."
    head_kind = "distil"

    def __init__(self, config: dict):
        super().__init__(config)
        h, sigma = config["hidden_size"], _sigma(config)
        self.distilbert = _DistilBody(config)
        self.pre_classifier = dense(h, h, sigma)
        self.classifier = dense(h, int(config["num_labels"]), sigma)
        self.output_hidden_states = False
        self.output_names = ("logits", "hidden_states")

    def construct(
        self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        last, states = self.distilbert(input_ids, attention_mask, position_ids)
        logits = self.classifier(ops.relu(self.pre_classifier(last[:, 0])))
        if want:
            return logits, states
        return (logits,)

    def hf_config_keys(self) -> set[str]:
        return super().hf_config_keys() - {"add_pooling_layer"}
