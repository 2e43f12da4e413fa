"""An exported folder run by ONNX Runtime: logits for evaluation, and a KV-cache generation loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from slimport.errors import SlimportError
from slimport.runtime.onnx.decoder import PAST, PRESENT


class OnnxModel:
    """`OnnxModel(folder)`: the folder's model.onnx in an ORT CPU session."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(folder) / "model.onnx"
        if not path.is_file():
            raise SlimportError(f"{folder}: no model.onnx", hint="export it with export_onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_layers = sum(1 for n in self.inputs if n.endswith(".key"))
        self.is_decoder = self.n_layers > 0
        if self.is_decoder:
            _, self.kv_heads, _, self.head_dim = self.inputs[PAST.format(0, "key")].shape

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {
            PAST.format(i, kv): np.zeros(shape, np.float32)
            for i in range(self.n_layers)
            for kv in ("key", "value")
        }

    def run(self, **feeds) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feeds), strict=True))

    def logits(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """One full forward pass (no cache): `logits`, or an encoder's last_hidden_state."""
        ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if self.is_decoder:
            out = self.step(ids, mask, self.empty_cache(len(ids)))[0]
            return out
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            tt = np.zeros_like(ids) if token_type_ids is None else token_type_ids
            feeds["token_type_ids"] = np.asarray(tt, np.int64)
        out = self.run(**feeds)
        return out.get("logits", out["last_hidden_state"])

    def feeds(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:  # GPT-2's learned positions (RoPE graphs need none)
            feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
        return feeds

    def step(self, ids: np.ndarray, mask: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """Feed `ids` [batch, new] after the cached tokens; `mask` covers cached + new tokens.
        Returns (logits [batch, new, vocab], the cache after these tokens)."""
        out = self.run(**self.feeds(ids, mask), **cache)
        present = {
            PAST.format(i, kv): out[PRESENT.format(i, kv)]
            for i in range(self.n_layers)
            for kv in ("key", "value")
        }
        return out["logits"], present

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        attention_mask=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        progress: bool = False,
    ) -> np.ndarray:
        """Prompt [batch, seq] (left-padded when batched) -> prompt + new tokens, greedy or
        sampled (transformers' order: repetition penalty, temperature, top-k, top-p); the prompt
        is read once, then each step feeds one token and the cache; `progress`: a bar of the new
        tokens on stderr (when it is a terminal)."""
        if not self.is_decoder:
            raise SlimportError("generate needs a decoder model (this folder is an encoder)")
        ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        rng = np.random.default_rng(seed)
        done = np.zeros(len(ids), bool)
        out, feed = ids, ids
        cache = InPlaceCache(self, len(ids), ids.shape[1] + max_new_tokens)
        bar = tqdm(range(max_new_tokens), desc="generating", unit="token", leave=False,
                   disable=not progress or None)  # fmt: skip
        for _ in bar:
            logits = cache.step(feed, mask)
            last = logits[:, -1].astype(np.float64)
            if repetition_penalty != 1.0:
                last = _penalize(last, np.where(mask.astype(bool), out, -1), repetition_penalty)
            nxt = _choose(last, do_sample, temperature, top_k, top_p, rng)
            if eos:
                nxt = np.where(done, next(iter(eos)), nxt)
                done |= np.isin(nxt, list(eos))
            feed = nxt[:, None]
            out = np.concatenate([out, feed], axis=1)
            mask = np.concatenate([mask, np.ones_like(feed)], axis=1)
            if eos and done.all():
                break
        return out


class InPlaceCache:
    """A decoder's KV cache that is never copied: one preallocated [batch, kv_heads, capacity,
    head_dim] buffer per past/present pair, bound (ORT IO binding) as both the input and the
    output, so GroupQueryAttention appends each step's keys and values in place, as
    onnxruntime-genai runs these graphs (past_present_share_buffer). `OnnxModel.step` is the
    plain form: numpy caches in and out, grown by a copy each step."""

    def __init__(self, model: OnnxModel, batch: int, capacity: int):
        import onnxruntime as ort

        self.model, self.binding = model, model.session.io_binding()
        self.vocab = model.session.get_outputs()[model.outputs.index("logits")].shape[-1]
        self.logits: dict[tuple, np.ndarray] = {}  # one output buffer per shape (prompt, step)
        shape = (batch, model.kv_heads, capacity, model.head_dim)
        self.buffers = []
        for i in range(model.n_layers):
            for kv in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self.binding.bind_ortvalue_input(PAST.format(i, kv), buf)
                self.binding.bind_ortvalue_output(PRESENT.format(i, kv), buf)
                self.buffers.append(buf)  # (kept alive here: the binding does not own them)

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`OnnxModel.step`'s logits, the cache advanced in place."""
        for name, value in self.model.feeds(ids, mask).items():
            self.binding.bind_cpu_input(name, value)
        shape = (*ids.shape, self.vocab)
        out = self.logits.setdefault(shape, np.empty(shape, np.float32))
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(shape), out.ctypes.data)
        self.model.session.run_with_iobinding(self.binding)
        return out.copy()  # (the buffer is written again by the next step of this shape)


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty: every token seen so far (-1: padding, none) is made
    less likely, a positive logit divided by `penalty`, a negative one multiplied."""
    logits = logits.copy()
    for row, tokens in enumerate(seen):
        t = np.unique(tokens[tokens >= 0])
        v = logits[row, t]
        logits[row, t] = np.where(v < 0, v * penalty, v / penalty)
    return logits


def _choose(logits, do_sample: bool, temperature: float, top_k: int, top_p: float, rng):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p
        order = np.argsort(-p, axis=-1)
        ranked = np.take_along_axis(p, order, -1)
        drop = np.cumsum(ranked, -1) - ranked >= top_p  # the first token is always kept
        kept = np.where(drop, 0.0, ranked)
        p = np.zeros_like(p)
        np.put_along_axis(p, order, kept, -1)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])
