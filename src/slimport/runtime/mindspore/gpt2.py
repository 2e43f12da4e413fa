"""GPT-2 in MindSpore (GPT2Model, GPT2LMHeadModel), numerically like transformers in fp32.

Parameter names are the `mindspore` dialect of arch/gpt2.py: the HF module tree, with the
Conv1D projections (c_attn, c_proj, c_fc) as nn.Dense weights [out, in] (the dialect transposes
them), nn.LayerNorm gamma/beta with `layer_norm_epsilon`, nn.Embedding embedding_table. The LM
head is tied to `wte` (GPT-2 always ties; an untied `lm_head.weight` is supported). Activation
`gelu_new` is the tanh GELU. GPT2LMHeadModel implements generate.py's KV-cache protocol.
"""

from __future__ import annotations

from typing import ClassVar

import mindspore as ms
from mindspore import nn, ops

from slimport.arch import gpt2 as arch
from slimport.convert import engine
from slimport.convert.loader import Model
from slimport.runtime.mindspore.base import PreTrainedCell
from slimport.runtime.mindspore.bert import activation, mask_min, rebase
from slimport.runtime.mindspore.generate import GenerationMixin, write_kv


def _dense(n_in: int, n_out: int, bias: bool = True) -> nn.Dense:
    return nn.Dense(
        n_in, n_out, has_bias=bias, weight_init="zeros"
    )  # weights come from the checkpoint


def _norm(cfg: dict) -> nn.LayerNorm:
    return nn.LayerNorm((cfg["hidden_size"],), epsilon=float(cfg["layer_norm_epsilon"]))


class GPT2Attention(nn.Cell):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        h = cfg["hidden_size"]
        self.hidden, self.n_heads = h, int(cfg["num_attention_heads"])
        self.head_dim = h // self.n_heads
        scaling = self.head_dim**-0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scaling /= layer_idx + 1
        self.scaling = float(scaling)
        self.c_attn = _dense(h, 3 * h)
        self.c_proj = _dense(h, h)

    def qkv(self, x):
        b, s, _ = x.shape
        q, k, v = ops.split(self.c_attn(x), self.hidden, axis=-1)

        def heads(t):
            return t.reshape(b, s, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

        return heads(q), heads(k), heads(v)

    def attend(self, q, k, v, blocked):
        """softmax(q k^T * scale) v with `blocked` [B, 1, S, L] (True = masked) set to the minimum."""
        scores = ops.matmul(q, k.swapaxes(-1, -2)) * self.scaling
        scores = ops.masked_fill(scores, blocked, ms.Tensor(mask_min(scores.dtype), scores.dtype))
        ctx = ops.matmul(ops.softmax(scores, axis=-1), v)
        b, _, s, _ = ctx.shape
        return self.c_proj(ctx.transpose(0, 2, 1, 3).reshape(b, s, self.hidden))

    def construct(self, x, blocked):
        q, k, v = self.qkv(x)
        return self.attend(q, k, v, blocked)

    def cached(self, x, blocked, key_cache, value_cache, kv_index):
        """Attention over the preallocated cache after writing this call's K/V at kv_index."""
        q, k, v = self.qkv(x)
        key_cache = write_kv(key_cache, k, kv_index)
        value_cache = write_kv(value_cache, v, kv_index)
        return self.attend(q, key_cache, value_cache, blocked)


class GPT2MLP(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.c_fc = _dense(cfg["hidden_size"], cfg["intermediate_size"])
        self.c_proj = _dense(cfg["intermediate_size"], cfg["hidden_size"])
        self.act = activation(cfg["activation_function"])

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Cell):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = _norm(cfg)
        self.mlp = GPT2MLP(cfg)

    def construct(self, x, blocked):
        x = x + self.attn(self.ln_1(x), blocked)
        return x + self.mlp(self.ln_2(x))

    def cached(self, x, blocked, key_cache, value_cache, kv_index):
        x = x + self.attn.cached(self.ln_1(x), blocked, key_cache, value_cache, kv_index)
        return x + self.mlp(self.ln_2(x))


def _build(cell: nn.Cell, cfg: dict) -> None:
    h = cfg["hidden_size"]
    cell.wte = nn.Embedding(cfg["vocab_size"], h, embedding_table="zeros")
    cell.wpe = nn.Embedding(cfg["n_positions"], h, embedding_table="zeros")
    cell.h = nn.CellList([GPT2Block(cfg, i) for i in range(cfg["num_hidden_layers"])])
    cell.ln_f = _norm(cfg)


def _embed(cell, input_ids, position_ids, token_type_ids):
    x = cell.wte(input_ids) + cell.wpe(position_ids)
    if token_type_ids is not None:  # transformers embeds token types with wte
        x = x + cell.wte(token_type_ids)
    return x


def _hidden(cell, input_ids, attention_mask, position_ids, token_type_ids):
    """(final normed hidden state, hidden states as transformers lists them)."""
    s = input_ids.shape[1]
    if position_ids is None:
        position_ids = ops.arange(0, s, dtype=ms.int32).reshape(1, -1)
    x = _embed(cell, input_ids, position_ids, token_type_ids)
    pos = ops.arange(0, s, dtype=ms.int32)
    allowed = (pos[None, :] <= pos[:, None])[None, None, :, :]
    if attention_mask is not None:
        allowed = ops.logical_and(allowed, (attention_mask != 0)[:, None, None, :])
    blocked = ops.logical_not(allowed)
    states = (x,)
    for block in cell.h:
        x = block(x, blocked)
        states = states + (x,)
    x = cell.ln_f(x)
    # transformers records the embeddings and every block's input, then the normed output
    return x, states[:-1] + (x,)


def _cached_hidden(cell, input_ids, position_ids, allowed, kv_index, key_cache, value_cache):
    """Normed hidden state of the last input position, reading/writing the KV cache."""
    x = _embed(cell, input_ids, position_ids, None)
    blocked = ops.logical_not(allowed)
    for i in range(len(cell.h)):
        x = cell.h[i].cached(x, blocked, key_cache[i], value_cache[i], kv_index)
    return cell.ln_f(x[:, -1:, :])


class _GPT2Body(nn.Cell):
    """The decoder stack, as `transformer.` inside GPT2LMHeadModel."""

    def __init__(self, cfg: dict):
        super().__init__()
        _build(self, cfg)

    def construct(self, input_ids, attention_mask, position_ids, token_type_ids):
        return _hidden(self, input_ids, attention_mask, position_ids, token_type_ids)

    def cached(self, input_ids, position_ids, allowed, kv_index, key_cache, value_cache):
        return _cached_hidden(
            self, input_ids, position_ids, allowed, kv_index, key_cache, value_cache
        )


class _GPT2Cell(PreTrainedCell):
    family: ClassVar[str] = arch.FAMILY.name
    base_prefix: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, config: dict):
        config = dict(config)
        config["architectures"] = [
            self.architectures[0]
        ]  # so the saved folder reloads as this class
        super().__init__(config)
        self.output_hidden_states = False

    def plan_parameters(self, model: Model) -> list[engine.Planned]:
        return rebase(model, self, self.base_prefix)


class GPT2Model(_GPT2Cell):
    """transformers' GPT2Model: last_hidden_state (after ln_f) (+ hidden_states)."""

    architectures = ("GPT2Model",)
    output_names = ("last_hidden_state", "hidden_states")

    def __init__(self, config: dict):
        super().__init__(config)
        self.config["tie_word_embeddings"] = True  # a bare model has no head to untie
        _build(self, config)

    def construct(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        output_hidden_states=None,
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        last, states = _hidden(self, input_ids, attention_mask, position_ids, token_type_ids)
        if want:
            return last, states
        return (last,)


class GPT2LMHeadModel(_GPT2Cell, GenerationMixin):
    """GPT2Model + LM head tied to wte (or `lm_head.weight` when untied): logits (+ hidden_states)."""

    architectures = ("GPT2LMHeadModel",)
    base_prefix = "transformer."
    output_names = ("logits", "hidden_states")

    def __init__(self, config: dict):
        super().__init__(config)
        self.transformer = _GPT2Body(config)
        self.tied = bool(config["tie_word_embeddings"])
        self.head_on_integers = False  # set by an int8 embedding (QuantEmbedding.logits)
        if not self.tied:
            self.lm_head = _dense(config["hidden_size"], config["vocab_size"], bias=False)
        self.head_matmul = ops.MatMul(transpose_b=True)

    def lm_logits(self, x):
        if self.tied:
            b, s, d = x.shape
            if self.head_on_integers:
                return self.transformer.wte.logits(x.reshape(b * s, d)).reshape(b, s, -1)
            w = self.transformer.wte.embedding_table
            return self.head_matmul(x.reshape(b * s, d), w).reshape(b, s, -1)
        return self.lm_head(x)

    def construct(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        output_hidden_states=None,
    ):
        want = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        last, states = self.transformer(input_ids, attention_mask, position_ids, token_type_ids)
        logits = self.lm_logits(last)
        if want:
            return logits, states
        return (logits,)

    # --- the cache protocol of generate.py ---------------------------------------------------
    def cache_layout(self) -> tuple[int, int, int]:
        c = self.config
        heads = int(c["num_attention_heads"])
        return int(c["num_hidden_layers"]), heads, int(c["hidden_size"]) // heads

    def max_positions(self) -> int:
        return int(self.config["n_positions"])

    def check_length(self, total: int) -> None:
        return None  # max_positions bounds GPT-2

    def forward_with_cache(
        self, input_ids, position_ids, allowed, kv_index, key_cache, value_cache
    ):
        h = self.transformer.cached(
            input_ids, position_ids, allowed, kv_index, key_cache, value_cache
        )
        return self.lm_logits(h)[:, 0, :]
