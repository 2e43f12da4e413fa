"""stories260K (a real llama2.c checkpoint) -> Hugging Face: same logits, same greedy text.

The reference is an independent NumPy float64 implementation of run.c's forward pass that
reads the .bin itself, so a RoPE-layout or GQA mistake in our tables cannot hide.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from slimport import api

PROMPT = [1, 403, 407, 261, 378, 299, 350]  # token ids (the 512-token tokenizer is not shipped)


class Llama2cReference:
    def __init__(self, path):
        with open(path, "rb") as f:
            raw = f.read()
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", raw[:28])
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head = dim // heads
        kv_dim = kv_heads * self.head
        w = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
        pos = 0

        def take(*shape):
            nonlocal pos
            n = int(np.prod(shape))
            out = w[pos : pos + n].reshape(shape)
            pos += n
            return out

        self.emb = take(abs(vocab), dim)
        self.att_norm = take(layers, dim)
        self.wq, self.wk = take(layers, dim, dim), take(layers, kv_dim, dim)
        self.wv, self.wo = take(layers, kv_dim, dim), take(layers, dim, dim)
        self.ffn_norm = take(layers, dim)
        self.w1, self.w2, self.w3 = (
            take(layers, hidden, dim),
            take(layers, dim, hidden),
            take(layers, hidden, dim),
        )
        self.final_norm = take(dim)
        take(seq, self.head // 2), take(seq, self.head // 2)  # legacy freq_cis tables
        self.wcls = self.emb if vocab > 0 else take(abs(vocab), dim)
        self.layers = layers

    @staticmethod
    def rmsnorm(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)

    def rope(self, x, n_heads):
        # run.c rotates adjacent pairs (x[2i], x[2i+1]) of each head by pos * 10000^(-2i/head)
        t = x.shape[0]
        x = x.reshape(t, n_heads, self.head // 2, 2)
        freq = 1.0 / 10000.0 ** (np.arange(0, self.head, 2) / self.head)
        ang = np.arange(t)[:, None] * freq[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(t, -1)

    def logits(self, tokens):
        x = self.emb[tokens]
        t = len(tokens)
        mask = np.triu(np.full((t, t), -np.inf), 1)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            h = self.rmsnorm(x, self.att_norm[i])
            q = self.rope(h @ self.wq[i].T, self.heads).reshape(t, self.heads, self.head)
            k = self.rope(h @ self.wk[i].T, self.kv_heads).reshape(t, self.kv_heads, self.head)
            v = (h @ self.wv[i].T).reshape(t, self.kv_heads, self.head)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.head) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", p, v).reshape(t, -1) @ self.wo[i].T
            h = self.rmsnorm(x, self.ffn_norm[i])
            g = h @ self.w1[i].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ self.w3[i].T)) @ self.w2[i].T
        return self.rmsnorm(x, self.final_norm) @ self.wcls.T


@pytest.fixture(scope="module")
def converted(stories260k, tmp_path_factory):
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("stories") / "hf"
    report = api.convert(stories260k, out, to="hf", progress=False)
    return report, LlamaForCausalLM.from_pretrained(out).eval()


def test_report_lists_every_tensor_with_its_rope_permutation(converted):
    report, _ = converted
    assert report["source_format"] == "llama2c" and report["tensor_count"] == 47
    q = next(
        t for t in report["tensors"] if t["target"] == "model.layers.0.self_attn.q_proj.weight"
    )
    assert q["sources"] == ["layers.0.attention.wq.weight"]
    assert q["ops"] == ["PermuteRope(num_attention_heads)^-1"]
    assert report["ignored_source_tensors"] == ["freq_cis_real", "freq_cis_imag"]


def test_logits_match_independent_numpy_forward(converted, stories260k):
    _, model = converted
    ref = Llama2cReference(stories260k).logits(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([PROMPT])).logits[0].double().numpy()
    delta = np.abs(ours - ref).max()
    print(f"stories260K logits max|delta| vs NumPy float64 reference: {delta:.3e}")
    assert delta <= 1e-4


def test_greedy_decoding_of_64_tokens_agrees(converted, stories260k):
    _, model = converted
    ref = Llama2cReference(stories260k)
    tokens = list(PROMPT)
    for _ in range(64):
        tokens.append(int(ref.logits(tokens)[-1].argmax()))
    with torch.no_grad():
        ours = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False, eos_token_id=None
        )
    assert ours[0].tolist() == tokens
