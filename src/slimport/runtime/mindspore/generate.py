"""Text generation with a preallocated KV cache, like transformers' `generate`.

Cache protocol: a causal-LM Cell gets `generate()` by inheriting `GenerationMixin` and
implementing four methods (LlamaForCausalLM in llama.py is the reference; GPT2LMHeadModel
implements the same):

* `cache_layout() -> (num_layers, num_kv_heads, head_dim)`: the cache is one Parameter per layer
  for keys and one for values, each [batch, num_kv_heads, cache_len, head_dim].
* `max_positions() -> int`: longest sequence the model supports (max_position_embeddings,
  n_positions); prompt + new tokens beyond it is an error.
* `check_length(total: int) -> None`: raise SlimportError for lengths the model cannot run
  (e.g. Mistral's sliding window); may do nothing.
* `forward_with_cache(input_ids, position_ids, allowed, kv_index, key_cache, value_cache)`
  -> logits of the LAST input position, [batch, vocab]. Graph-mode code (it is compiled as
  part of `CachedStep.construct`); every index/mask is built on the host (NumPy) and passed in,
  because index-building ops (arange, ...) cost ~1 ms each in PYNATIVE_MODE:
  - `input_ids`, `position_ids`: [batch, S] int32 (S = prompt length for the prefill, 1 for
    each decode step). Positions are cumsum(mask) - 1 like transformers, so learned absolute
    position embeddings (GPT-2) index with `position_ids` directly.
  - `allowed`: [batch, 1, S, cache_len] bool, True where query s may attend cache column j
    (causal and not padding; unwritten columns are never allowed). Additive/blocked masks
    derive from it in the graph (`ops.logical_not(allowed)`).
  - `kv_index`: [batch, num_kv_heads, S, 3] int32 scatter indices of this call's K/V; each
    attention layer stores its new K/V with `write_kv(cache, new, kv_index)` (ScatterNdUpdate on
    the cache Parameter: in place, no concat) and then attends over the whole returned cache.
  - `key_cache`, `value_cache`: tuples (one per layer) of the cache Parameters.
  Prompts are LEFT padded, so every row writes the same cache columns.

Static shapes: the decode step always sees [batch, 1] ids and a fixed cache length, and the
write position travels inside Tensors (`kv_index`, `allowed`, `position_ids`), so in GRAPH_MODE
it compiles once per (batch, cache_len) and is reused by later calls (`CachedStep.compile_count`
counts the graphs); the prefill compiles once per prompt length. The cache length is
prompt + max_new_tokens rounded up to a multiple of CACHE_BUCKET (within the model's limit) so
prompts of different lengths share the decode graph. Logits processing (repetition penalty,
temperature, top-k, top-p) and sampling run in NumPy on the host with transformers' semantics;
sampling uses NumPy's generator (`seed`), so sampled tokens are reproducible but not
transformers' (torch's RNG) tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, nn, ops
from tqdm import tqdm

from slimport.errors import SlimportError

CACHE_BUCKET = 64
STEP_CACHE = 4  # step Cells (cache + compiled graphs) kept per model, least recently used dropped


# --- helpers for models implementing the protocol ------------------------------------------
def write_kv(cache, new, kv_index):
    """Graph side: write new [B, H, S, D] into cache [B, H, L, D] at the columns kv_index names
    (ScatterNdUpdate on the Parameter: in place, no concat)."""
    if new.dtype != cache.dtype:
        new = new.astype(cache.dtype)
    return ops.scatter_nd_update(cache, kv_index, new)


def host_kv_index(batch: int, kv_heads: int, start: int, length: int) -> np.ndarray:
    """Host side: int32 [B, H, S, 3] indices (b, h, start + s) for write_kv."""
    grid = np.meshgrid(
        np.arange(batch), np.arange(kv_heads), np.arange(start, start + length), indexing="ij"
    )
    return np.stack(grid, -1).astype(np.int32)


def host_attention_allowed(cache_mask: np.ndarray, start: int, length: int) -> np.ndarray:
    """Host side: [B, 1, S, L] bool; query s (cache column start+s) sees column j <= start+s
    where cache_mask[b, j] is set."""
    cols = np.arange(cache_mask.shape[1])[None, :]
    rows = np.arange(start, start + length)[:, None]
    return ((cols <= rows)[None, None] & (cache_mask != 0)[:, None, None, :]).astype(np.bool_)


class CachedStep(nn.Cell):
    """One forward over the cache (prefill or decode) for a fixed batch and cache length.

    Holds the cache Parameters; the model is referenced, not re-prefixed (auto_prefix=False
    keeps the model's parameter names). `compile_count` is how many graphs GRAPH_MODE built.
    """

    def __init__(self, model, batch: int, cache_len: int, dtype):
        super().__init__(auto_prefix=False)
        self.model = model
        self.batch, self.cache_len = batch, cache_len
        layers, kv_heads, head_dim = model.cache_layout()
        shape = (batch, kv_heads, cache_len, head_dim)

        def cache(kind):
            return ParameterTuple(
                Parameter(ops.zeros(shape, dtype), name=f"kv_cache.{kind}.{i}", requires_grad=False)
                for i in range(layers)
            )

        self.key_cache, self.value_cache = cache("key"), cache("value")

    @property
    def compile_count(self) -> int:
        return len(getattr(self, "compile_cache", ()))

    def construct(self, input_ids, position_ids, allowed, kv_index):
        return self.model.forward_with_cache(
            input_ids, position_ids, allowed, kv_index, self.key_cache, self.value_cache
        )

    def run(self, ids: np.ndarray, positions: np.ndarray, cache_mask: np.ndarray, start: int):
        """One call from the host: ids/positions [B, S] written at cache columns start.."""
        s = ids.shape[1]
        _, kv_heads, _ = self.model.cache_layout()
        return self(
            ms.Tensor(ids.astype(np.int32)),
            ms.Tensor(positions.astype(np.int32)),
            ms.Tensor(host_attention_allowed(cache_mask, start, s)),
            ms.Tensor(host_kv_index(self.batch, kv_heads, start, s)),
        )


@dataclass
class GenerateOutput:
    """`return_dict_in_generate=True`: sequences plus per-step raw logits / processed scores."""

    sequences: object
    logits: tuple[np.ndarray, ...] | None = None
    scores: tuple[np.ndarray, ...] | None = None


# --- logits processing (transformers' processors, NumPy float32) -------------------------------
def repetition_penalty_(scores: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: every id seen (prompt and pads included)."""
    rows = np.arange(scores.shape[0])[:, None]
    seen = scores[rows, ids]
    scores[rows, ids] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    return scores


def top_k_filter(scores: np.ndarray, top_k: int) -> np.ndarray:
    k = min(max(int(top_k), 1), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability sums past top_p (at least one)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, like transformers
    probs = _softmax(np.take_along_axis(scores, order, -1)).astype(np.float32)
    remove_sorted = np.cumsum(probs, -1, dtype=np.float32) <= np.float32(1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, -np.inf, scores).astype(np.float32)


def process_logits(
    logits: np.ndarray,
    seen_ids: np.ndarray,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> np.ndarray:
    """Processed scores in transformers' order: repetition penalty, then (sampling only)
    temperature, top-k, top-p."""
    scores = np.array(logits, dtype=np.float32, copy=True)
    if repetition_penalty != 1.0:
        scores = repetition_penalty_(scores, seen_ids, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            scores = scores / np.float32(temperature)
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores); never a token of probability zero."""
    cdf = np.cumsum(_softmax(scores.astype(np.float64)), -1)
    u = rng.random((scores.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(-1), scores.shape[-1] - 1)


# --- the mixin ------------------------------------------------------------------------------
def _ids_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _as_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, ms.Tensor):
        x = x.asnumpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything not array-like is the user's input error
        raise SlimportError(f"{what}: expected a MindSpore Tensor or NumPy array ({e})") from None
    return arr


class GenerationMixin:
    """`generate()` for Cells implementing the cache protocol described in this module."""

    def _cached_step(self, batch: int, cache_len: int) -> CachedStep:
        """The step Cell for this (batch, cache_len), reused across calls (one compile each).

        The last STEP_CACHE shapes are kept (their caches and compiled graphs), so alternating
        shapes (e.g. a benchmark timing 1 and 65 new tokens) does not recompile. Kept in
        __dict__, not as Cell attributes: the model must not own the cache Parameters."""
        floats = (ms.float16, ms.bfloat16, ms.float32, ms.float64)  # not the integers held
        dtype = next(p.dtype for p in self.get_parameters() if p.dtype in floats)
        steps = self.__dict__.setdefault("_generation_steps", OrderedDict())
        key = (batch, cache_len, dtype)
        step = steps.pop(key, None) or CachedStep(self, batch, cache_len, dtype)
        steps[key] = step
        while len(steps) > STEP_CACHE:
            steps.popitem(last=False)
        self.__dict__["_generation_step"] = step
        return step

    @property
    def generation_step(self) -> CachedStep | None:
        """The last step Cell used by generate (its `compile_count` shows GRAPH_MODE compiles)."""
        return self.__dict__.get("_generation_step")

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        max_cache_len: int | None = None,
        return_dict_in_generate: bool = False,
        output_logits: bool = False,
        output_scores: bool = False,
        progress: bool = False,
    ):
        """Prompt + new tokens, like transformers' `generate` (same type as `input_ids`).
        `progress`: a bar of the new tokens on stderr (when it is a terminal).

        Greedy unless `do_sample`; `top_k=0` and `top_p=1.0` disable those filters. Rows that
        produced an eos get `pad_token_id` afterwards (pad defaults to the config's, then to the
        first eos); generation stops when every row has finished or after `max_new_tokens`.
        Batched prompts must be LEFT padded with `attention_mask` 0 on the pads.
        """
        as_tensor = isinstance(input_ids, ms.Tensor)
        ids = _as_numpy(input_ids, "input_ids")
        out_dtype = ids.dtype
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise SlimportError(
                f"input_ids: expected integer token ids [batch, length], got {ids.dtype} {list(ids.shape)}",
                hint="pass tokenizer(...)['input_ids'] as an int32/int64 array",
            )
        ids = ids.astype(np.int64)
        vocab = int(self.config["vocab_size"])
        if ids.min() < 0 or ids.max() >= vocab:
            raise SlimportError(
                f"input_ids: token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}"
            )
        cfg = self.config
        eos = _ids_list(eos_token_id if eos_token_id is not None else cfg.get("eos_token_id"))
        pad = pad_token_id if pad_token_id is not None else cfg.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        pad = int(pad)
        mask = self._prompt_mask(ids, attention_mask, pad, eos)
        self._check_options(
            max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
        )

        batch, prompt_len = ids.shape
        total = prompt_len + max_new_tokens
        limit = self.max_positions()
        cache_len = self._cache_len(prompt_len, total, limit, max_cache_len)
        self.check_length(total)
        step = self._cached_step(batch, cache_len)
        rng = np.random.default_rng(seed)

        cache_mask = np.zeros((batch, cache_len), np.int32)
        cache_mask[:, :prompt_len] = mask
        positions = np.where(mask != 0, np.cumsum(mask, -1) - 1, 0).astype(np.int32)
        next_pos = positions[:, -1:] + 1
        logits = step.run(ids, positions, cache_mask, 0)
        seqs = ids
        unfinished = np.ones(batch, bool)
        raw_steps, score_steps = [], []
        bar = tqdm(total=max_new_tokens, desc="generating", unit="token", leave=False,
                   disable=not progress or None)  # fmt: skip
        for t in range(max_new_tokens):
            bar.update(1)
            raw = logits.asnumpy()  # the model's dtype (float64 models give float64 logits)
            scores = process_logits(
                raw, seqs, do_sample, temperature, top_k, top_p, repetition_penalty
            )
            if output_logits:
                raw_steps.append(raw)
            if output_scores:
                score_steps.append(scores)
            nxt = sample(scores, rng) if do_sample else scores.argmax(-1)
            nxt = np.where(unfinished, nxt, pad).astype(np.int64)
            seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
            if eos:
                unfinished &= ~np.isin(nxt, eos)
            if not unfinished.any() or t == max_new_tokens - 1:
                break
            write = prompt_len + t
            cache_mask[:, write] = 1
            logits = step.run(nxt[:, None], next_pos, cache_mask, write)
            next_pos = next_pos + 1

        bar.close()
        out = seqs.astype(out_dtype)
        if np.asarray(input_ids if not as_tensor else ids).ndim == 1:
            out = out[0]
        out = ms.Tensor(out) if as_tensor else out
        if return_dict_in_generate:
            return GenerateOutput(
                out,
                tuple(raw_steps) if output_logits else None,
                tuple(score_steps) if output_scores else None,
            )
        return out

    # --- checks -------------------------------------------------------------------------
    @staticmethod
    def _prompt_mask(ids: np.ndarray, attention_mask, pad: int, eos: list[int]) -> np.ndarray:
        if attention_mask is None:
            # transformers: pads are inferred only when pad is distinct from eos
            if pad in ids and pad not in eos:
                return (ids != pad).astype(np.int32)
            return np.ones(ids.shape, np.int32)
        mask = _as_numpy(attention_mask, "attention_mask")
        mask = mask[None, :] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise SlimportError(
                f"attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}"
            )
        mask = (mask != 0).astype(np.int32)
        if not mask[:, -1].all():
            raise SlimportError(
                "attention_mask: the last position of every row must be a real token",
                hint="pad batched prompts on the LEFT (tokenizer.padding_side = 'left')",
            )
        return mask

    @staticmethod
    def _check_options(
        max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
    ) -> None:
        bad = []
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            bad.append(f"max_new_tokens={max_new_tokens!r} (an int >= 1)")
        if do_sample and not temperature > 0:
            bad.append(f"temperature={temperature!r} (> 0)")
        if top_k < 0:
            bad.append(f"top_k={top_k!r} (>= 0; 0 disables)")
        if not 0 < top_p <= 1:
            bad.append(f"top_p={top_p!r} (in (0, 1])")
        if not repetition_penalty > 0:
            bad.append(f"repetition_penalty={repetition_penalty!r} (> 0)")
        if bad:
            raise SlimportError("generate: invalid option(s): " + "; ".join(bad))

    @staticmethod
    def _cache_len(prompt_len: int, total: int, limit: int, max_cache_len: int | None) -> int:
        if max_cache_len is not None:
            if prompt_len > max_cache_len:
                raise SlimportError(
                    f"the prompt ({prompt_len} tokens) is longer than the KV cache (max_cache_len={max_cache_len})",
                    hint="raise max_cache_len or shorten the prompt",
                )
            if total > max_cache_len:
                raise SlimportError(
                    f"prompt ({prompt_len}) + max_new_tokens ({total - prompt_len}) exceed the KV cache "
                    f"(max_cache_len={max_cache_len})",
                    hint="raise max_cache_len or lower max_new_tokens",
                )
        if prompt_len > limit:
            raise SlimportError(
                f"the prompt ({prompt_len} tokens) is longer than the model's maximum of {limit} positions",
                hint="shorten the prompt (max_position_embeddings in the config)",
            )
        if total > limit:
            raise SlimportError(
                f"prompt ({prompt_len}) + max_new_tokens ({total - prompt_len}) exceed the model's "
                f"maximum of {limit} positions",
                hint=f"lower max_new_tokens to at most {limit - prompt_len}",
            )
        if max_cache_len is not None:
            return int(max_cache_len)
        return min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, limit)
