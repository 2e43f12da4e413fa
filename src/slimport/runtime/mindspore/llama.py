"""Llama family in MindSpore (Llama, Mistral, Qwen2, SmolLM), numerically like transformers.

GQA, RMSNorm computed in float32 (transformers' LlamaRMSNorm), SwiGLU, rotate-half RoPE with
theta from the config, tied embeddings (the head reuses `embed_tokens.embedding_table`; there
is no `lm_head` parameter then). Parameter names are the `mindspore` dialect of arch/llama.py:
the HF module tree with nn.Embedding's `embedding_table`.

Attention keeps K/V at `num_key_value_heads` and folds the query heads of one KV group into the
row dimension ([B, Hkv, n_rep*S, D] @ [B, Hkv, D, L]) instead of repeating K/V n_rep times:
the same dot products as transformers' repeat_kv, without copying the cache every step.
"""

from __future__ import annotations

from typing import ClassVar

import mindspore as ms
import numpy as np
import torch
from mindspore import Parameter, nn, ops

from slimport.convert import engine
from slimport.errors import SlimportError
from slimport.runtime.mindspore.base import PreTrainedCell
from slimport.runtime.mindspore.generate import GenerationMixin, write_kv

_MIN = float(np.finfo(np.float32).min)  # transformers' additive mask value (scores are float32)
# MindSpore's CPU exp has ~5e-6 relative error (torch's ~3.5e-7, measured on random inputs), so on
# CPU the attention softmax runs in float64: SmolLM2 logits go from 1.2e-4 to 9.5e-5 of
# transformers' fp32 on three chat prompts. Other backends keep float32.
_PRECISE_SOFTMAX = ms.get_context("device_target") == "CPU"


def rope_tables(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim] exactly as transformers computes them
    (torch float32: inv_freq = 1 / theta**(2i/d), freqs = pos * inv_freq, emb = [freqs, freqs]);
    the first half of sin is negated (rotate_half's sign)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise SlimportError(
            f"rope_type={kind!r} is not supported by the MindSpore Llama runtime",
            hint="only the default RoPE (theta from rope_theta) is implemented",
        )
    dim, theta = int(cfg["head_dim"]), float(cfg["rope_theta"])
    n = int(cfg.get("max_position_embeddings") or 2048)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = inv_freq[:, None].float() @ torch.arange(n, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs.T, freqs.T), dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2] *= -1  # rotate_half's sign, folded in (see LlamaAttention._qkv)
    return emb.cos().numpy(), sin.numpy()


def _at_least_f32(x):
    """fp16/bf16 -> float32 like transformers' upcasts; float32/float64 stay as they are."""
    if x.dtype in (ms.float16, ms.bfloat16):
        return x.astype(ms.float32)
    return x


class LlamaRMSNorm(nn.Cell):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = Parameter(ops.ones((hidden_size,), ms.float32), name="weight")
        self.eps = float(eps)

    def construct(self, x):
        dtype = x.dtype
        h = _at_least_f32(x)
        variance = ops.mean(ops.square(h), -1, keep_dims=True)
        h = h * ops.rsqrt(variance + self.eps)
        return self.weight * h.astype(dtype)


def _heads(x, b: int, s: int, n: int, d: int):
    """[B, S, n*d] -> [B, n, S, d]; a plain reshape for one token."""
    if s == 1:
        return x.reshape(b, n, 1, d)
    return x.reshape(b, s, n, d).transpose(0, 2, 1, 3)


class LlamaAttention(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, d = cfg["hidden_size"], cfg["head_dim"]
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            d,
        )
        self.n_rep = self.num_heads // self.num_kv_heads
        self.scaling = float(d**-0.5)
        # rotate_half(x) * sin == x[..., swap] * sin_signed (sign folded into the table, exact):
        # one Gather instead of two slices, a negation and a concat
        self.swap = ms.Tensor(np.r_[np.arange(d // 2, d), np.arange(d // 2)].astype(np.int32))
        qkv_bias, o_bias = bool(cfg["qkv_bias"]), bool(cfg["o_bias"])
        self.q_proj = nn.Dense(hidden, cfg["q_dim"], has_bias=qkv_bias, weight_init="zeros")
        self.k_proj = nn.Dense(hidden, cfg["kv_dim"], has_bias=qkv_bias, weight_init="zeros")
        self.v_proj = nn.Dense(hidden, cfg["kv_dim"], has_bias=qkv_bias, weight_init="zeros")
        self.o_proj = nn.Dense(cfg["q_dim"], hidden, has_bias=o_bias, weight_init="zeros")
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)

    def _qkv(self, x, cos, sin):
        """Projections in [B, heads, S, D] with RoPE applied to q and k."""
        b, s, _ = x.shape
        q = _heads(self.q_proj(x), b, s, self.num_heads, self.head_dim)
        k = _heads(self.k_proj(x), b, s, self.num_kv_heads, self.head_dim)
        v = _heads(self.v_proj(x), b, s, self.num_kv_heads, self.head_dim)
        q = q * cos + ops.gather(q, self.swap, 3) * sin
        k = k * cos + ops.gather(k, self.swap, 3) * sin
        return q, k, v

    def _attend(self, q, k, v, blocked):
        """softmax(q k^T * scale, masked) v; `blocked` [B, 1, n_rep*S, L] is True where masked."""
        b, h, s, d = q.shape
        q = q.reshape(b, self.num_kv_heads, self.n_rep * s, d)
        scores = _at_least_f32(self.qk_matmul(q, k) * self.scaling)
        scores = ops.masked_fill(scores, blocked, _MIN)
        if _PRECISE_SOFTMAX:
            scores = scores.astype(ms.float64)
        probs = ops.softmax(scores, -1).astype(v.dtype)
        out = ops.matmul(probs, v)
        if s > 1:  # static in graph mode; one token needs no transpose (saves a copy per step)
            out = out.reshape(b, h, s, d).transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, s, h * d))

    def construct(self, x, cos, sin, blocked):
        q, k, v = self._qkv(x, cos, sin)
        return self._attend(q, k, v, blocked)

    def cached(self, x, cos, sin, blocked, key_cache, value_cache, kv_index):
        """Attention over the preallocated cache after writing this call's K/V at kv_index."""
        q, k, v = self._qkv(x, cos, sin)
        key_cache = write_kv(key_cache, k, kv_index)
        value_cache = write_kv(value_cache, v, kv_index)
        return self._attend(q, key_cache, value_cache, blocked)


class LlamaMLP(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter, bias = cfg["hidden_size"], cfg["intermediate_size"], bool(cfg["mlp_bias"])
        self.gate_proj = nn.Dense(hidden, inter, has_bias=bias, weight_init="zeros")
        self.up_proj = nn.Dense(hidden, inter, has_bias=bias, weight_init="zeros")
        self.down_proj = nn.Dense(inter, hidden, has_bias=bias, weight_init="zeros")

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = LlamaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def _ffn(self, h):
        return h + self.mlp(self.post_attention_layernorm(h))

    def construct(self, x, cos, sin, blocked):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, blocked)
        return self._ffn(h)

    def cached(self, x, cos, sin, blocked, key_cache, value_cache, kv_index):
        a = self.self_attn.cached(
            self.input_layernorm(x), cos, sin, blocked, key_cache, value_cache, kv_index
        )
        return self._ffn(x + a)


def _check_config(cfg: dict) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise SlimportError(
            f"hidden_act={cfg['hidden_act']!r} is not supported by the MindSpore Llama runtime",
            hint="Llama/Mistral/Qwen2 use silu (SwiGLU)",
        )
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise SlimportError(
            f"num_attention_heads={cfg['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={cfg['num_key_value_heads']}"
        )


def sliding_window(cfg: dict) -> int | None:
    """The attention window the model uses, if any (Mistral; Qwen2 only with use_sliding_window)."""
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


class LlamaModel(PreTrainedCell):
    """The decoder stack: embeddings, blocks, final norm (transformers' LlamaModel)."""

    family = "llama"
    architectures = ("LlamaModel", "MistralModel", "Qwen2Model")
    output_names: ClassVar[tuple[str, ...]] = ("last_hidden_state", "hidden_states")

    def __init__(self, config: dict, output_hidden_states: bool = False):
        super().__init__(config)
        _check_config(config)
        self.num_layers = int(config["num_hidden_layers"])
        self.n_rep = config["num_attention_heads"] // config["num_key_value_heads"]
        self.output_hidden_states = output_hidden_states
        self.embed_tokens = nn.Embedding(
            config["vocab_size"], config["hidden_size"], embedding_table="zeros"
        )
        self.layers = nn.CellList([LlamaDecoderLayer(config) for _ in range(self.num_layers)])
        self.norm = LlamaRMSNorm(config["hidden_size"], config["rms_norm_eps"])
        cos, sin = rope_tables(config)
        # computed constants, not parameters: never loaded, never saved
        self.rope_cos, self.rope_sin = ms.Tensor(cos), ms.Tensor(sin)
        # our names are the checkpoint's (`model.` + module path) also for the bare model
        self.update_parameters_name("model.")

    def plan_parameters(self, model) -> list[engine.Planned]:
        # the bare decoder takes everything but the LM head of a causal-LM checkpoint
        return [t for t in super().plan_parameters(model) if not t.name.startswith("lm_head.")]

    def __call__(self, input_ids, *args, **kwargs):
        check_window(self.config, input_ids.shape[-1])
        return super().__call__(input_ids, *args, **kwargs)

    # --- pieces shared by the plain forward and the cached step ---------------------------
    def embed(self, input_ids):
        return self.embed_tokens(input_ids.astype(ms.int32))

    def rope(self, position_ids, dtype):
        """cos/sin [B, 1, S, D] for the given positions (transformers' rotary_emb)."""
        ids = position_ids.astype(ms.int32)
        cos = ops.gather(self.rope_cos, ids, 0).astype(dtype)
        sin = ops.gather(self.rope_sin, ids, 0).astype(dtype)
        return ops.expand_dims(cos, 1), ops.expand_dims(sin, 1)

    def fold_mask(self, allowed):
        """[B, 1, S, L] allowed -> [B, 1, n_rep*S, L] blocked, rows in the folded-GQA order."""
        blocked = ops.logical_not(allowed)
        if self.n_rep > 1:
            blocked = ops.tile(blocked, (1, 1, self.n_rep, 1))
        return blocked

    def hidden(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        """(last_hidden_state, hidden_states tuple or None): transformers' forward without cache."""
        b, s = input_ids.shape
        h = self.embed(input_ids)
        if position_ids is None:
            position_ids = ops.broadcast_to(ops.arange(s, dtype=ms.int32)[None, :], (b, s))
        cos, sin = self.rope(position_ids, h.dtype)
        pos = ops.arange(s, dtype=ms.int32)
        allowed = (pos[None, :] <= pos[:, None])[None, None, :, :]
        if attention_mask is not None:
            allowed = ops.logical_and(allowed, (attention_mask != 0)[:, None, None, :])
        else:
            allowed = ops.broadcast_to(allowed, (b, 1, s, s))
        blocked = self.fold_mask(allowed)
        states = (h,)
        for i in range(self.num_layers):
            h = self.layers[i](h, cos, sin, blocked)
            states = states + (h,)
        h = self.norm(h)
        if output_hidden_states:
            # like transformers: the last entry is the normed output, not the last block's
            return h, states[:-1] + (h,)
        return h, None

    def cached_hidden(self, input_ids, position_ids, allowed, kv_index, key_cache, value_cache):
        """Normed hidden state [B, hidden] of the last position, reading/writing the KV cache."""
        h = self.embed(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        blocked = self.fold_mask(allowed)
        for i in range(self.num_layers):
            h = self.layers[i].cached(h, cos, sin, blocked, key_cache[i], value_cache[i], kv_index)
        b, s, d = h.shape
        if s > 1:
            h = h[:, -1, :]
        return self.norm(h.reshape(b, d))

    def construct(
        self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None
    ):
        if output_hidden_states is None:
            output_hidden_states = self.output_hidden_states
        h, states = self.hidden(input_ids, attention_mask, position_ids, output_hidden_states)
        if output_hidden_states:
            return h, states
        return (h,)


class LlamaForCausalLM(PreTrainedCell, GenerationMixin):
    """LlamaModel + LM head (tied to the embeddings when `tie_word_embeddings`)."""

    family = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    output_names: ClassVar[tuple[str, ...]] = ("logits", "hidden_states")

    def __init__(self, config: dict, output_hidden_states: bool = False):
        super().__init__(config)
        self.output_hidden_states = output_hidden_states
        self.model = LlamaModel(config)
        self.tied = bool(config["tie_word_embeddings"])
        self.head_on_integers = False  # set by an int8 embedding (QuantEmbedding.logits)
        if not self.tied:
            self.lm_head = nn.Dense(
                config["hidden_size"], config["vocab_size"], has_bias=False, weight_init="zeros"
            )
        self.head_matmul = ops.MatMul(transpose_b=True)

    def __call__(self, input_ids, *args, **kwargs):
        check_window(self.config, input_ids.shape[-1])
        return super().__call__(input_ids, *args, **kwargs)

    def lm_logits(self, h):
        """[..., hidden] -> [..., vocab]."""
        if self.tied:
            lead, d = h.shape[:-1], h.shape[-1]
            if self.head_on_integers:
                return self.model.embed_tokens.logits(h.reshape(-1, d)).reshape(lead + (-1,))
            w = self.model.embed_tokens.embedding_table
            return self.head_matmul(h.reshape(-1, d), w).reshape(lead + (-1,))
        return self.lm_head(h)

    def construct(
        self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None
    ):
        if output_hidden_states is None:
            output_hidden_states = self.output_hidden_states
        h, states = self.model.hidden(input_ids, attention_mask, position_ids, output_hidden_states)
        logits = self.lm_logits(h)
        if output_hidden_states:
            return logits, states
        return (logits,)

    # --- the cache protocol of generate.py ---------------------------------------------------
    def cache_layout(self) -> tuple[int, int, int]:
        c = self.config
        return int(c["num_hidden_layers"]), int(c["num_key_value_heads"]), int(c["head_dim"])

    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    def check_length(self, total: int) -> None:
        check_window(self.config, total)

    def forward_with_cache(
        self, input_ids, position_ids, allowed, kv_index, key_cache, value_cache
    ):
        h = self.model.cached_hidden(
            input_ids, position_ids, allowed, kv_index, key_cache, value_cache
        )
        return self.lm_logits(h)


def check_window(cfg: dict, length: int) -> None:
    window = sliding_window(cfg)
    if window is not None and length > window:
        raise SlimportError(
            f"{length} tokens exceed the model's sliding_window={window}: sliding-window "
            "attention is not implemented in the MindSpore runtime",
            hint=f"keep prompt + new tokens within {window}",
        )
