"""The invertible ops rule tables are built from, and the op-count check of a rule.

* PermuteRope is checked against llama.cpp's permutation written out independently, and against
  RoPE itself; Concat/Split, Tie, Cast, Transpose and Unsqueeze invert;
* a rule whose op chain does not turn its hub tensors into its dialect tensors is refused when
  it is defined; a failing op names its tensors (through the engine: tests/test_families.py).
"""

from __future__ import annotations

import pytest
import torch

from slimport.arch.ops import At, Cast, Concat, PermuteRope, Tie, Transpose, Unsqueeze, run_ops
from slimport.arch.rules import Kind, bias_of, hub_of, rule
from slimport.errors import SlimportError


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp/Meta q,k row order written out by index: within each head, HF keeps the two
    rotation halves apart (rows i and i + d/2 form pair i); interleaved puts them side by side."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


@pytest.mark.parametrize(("heads", "shape"), [(4, (32, 24)), (2, (16, 24)), (4, (32,))])
def test_permute_rope_matches_llama_cpp_and_inverts(heads, shape):
    cfg = {"n": heads}
    w = torch.randn(shape)
    (p,) = PermuteRope("n").forward([w], cfg)
    assert torch.equal(p, _llama_cpp_permute(w, heads))
    assert torch.equal(PermuteRope("n").inverse([p], cfg)[0], w)


def test_permute_rope_turns_rotate_half_rope_into_interleaved_rope():
    """The permutation is the one under which HF's rotate-half RoPE equals Meta's pairwise RoPE."""
    heads, d, dim, pos = 2, 8, 12, 5
    w, x = torch.randn(heads * d, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    freqs = pos / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([freqs, freqs]).cos(), torch.cat([freqs, freqs]).sin()
    q = (w @ x).view(heads, d)
    hf = (
        q * cos + torch.cat([-q[:, d // 2 :], q[:, : d // 2]], dim=1) * sin
    )  # transformers' rotate_half
    (wp,) = PermuteRope("n").forward([w], {"n": heads})
    pairs = torch.view_as_complex((wp @ x).view(heads, d // 2, 2).contiguous())
    meta = torch.view_as_real(pairs * torch.polar(torch.ones_like(freqs), freqs)).reshape(
        heads * d
    )  # Meta's
    assert torch.allclose(
        meta, _llama_cpp_permute(hf.reshape(heads * d, 1), heads).flatten(), atol=1e-12
    )


def test_concat_and_split_are_inverse_and_split_checks_sizes():
    cfg = {"q": 8, "kv": 4}
    op = Concat(0, lambda c: [c["q"], c["kv"], c["kv"]])
    parts = [torch.randn(8, 5), torch.randn(4, 5), torch.randn(4, 5)]
    (fused,) = op.forward(parts, cfg)
    assert fused.shape == (16, 5)
    assert all(torch.equal(a, b) for a, b in zip(op.inverse([fused], cfg), parts, strict=True))
    with pytest.raises(SlimportError, match="cannot split"):
        op.inverse([torch.randn(15, 5)], cfg)


def test_tie_duplicates_and_refuses_differing_copies():
    t = torch.randn(6, 3)
    a, b = Tie().forward([t], {})
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert torch.equal(Tie().inverse([a, b], {})[0], t)
    with pytest.raises(SlimportError, match="tied tensors differ"):
        Tie().inverse([t, t + 1e-7], {})
    meta = torch.empty(6, 3, device="meta")
    assert Tie().inverse([meta, meta], {})[0].shape == (6, 3)  # planning never compares


def test_tie_then_transpose_of_the_copy_round_trips():
    ops = (Tie(), At(1, Transpose()))
    t = torch.randn(7, 3)
    emb, kernel = run_ops(ops, [t], {}, inverse=False)
    assert torch.equal(emb, t) and torch.equal(kernel, t.T)
    assert torch.equal(run_ops(ops, [emb, kernel], {}, inverse=True)[0], t)
    with pytest.raises(SlimportError, match="tied tensors differ"):
        run_ops(ops, [emb, kernel * 2], {}, inverse=True)


def test_cast_is_explicit_and_only_touches_floats():
    x, i = torch.randn(4, dtype=torch.float32), torch.arange(4)
    y, j = Cast(torch.bfloat16, torch.float32).forward([x, i], {})
    assert y.dtype == torch.bfloat16 and j.dtype == torch.int64 and torch.equal(j, i)
    (z,) = Cast(torch.bfloat16, torch.float32).inverse([y], {})
    assert z.dtype == torch.float32 and torch.equal(z, y.float())
    assert Cast(torch.float16).inverse([y], {})[0] is y  # no recorded source: left alone


def test_transpose_and_unsqueeze_invert():
    w, b = torch.randn(3, 5), torch.randn(5)
    assert torch.equal(
        run_ops((Transpose(),), run_ops((Transpose(),), [w], {}, False), {}, True)[0], w
    )
    (u,) = Unsqueeze(0).forward([b], {})
    assert u.shape == (1, 5) and torch.equal(Unsqueeze(0).inverse([u], {})[0], b)
    with pytest.raises(SlimportError, match="size-1 axis"):
        Unsqueeze(0).inverse([torch.randn(2, 5)], {})


# ---------------------------------------------------------------------------- arity


def test_a_rule_whose_op_chain_does_not_fit_its_names_is_refused_when_defined():
    def sizes(c):
        return [8, 4, 4]

    with pytest.raises(ValueError, match=r"Transpose\(0, 1\) takes 1 tensor\(s\), not 2"):
        rule(("a.weight", "b.weight"), "c.kernel", Transpose())
    with pytest.raises(ValueError, match=r"turns 3 tensor\(s\) into 1, but the rule names 2"):
        rule(("q", "k", "v"), ("qkv", "extra"), Concat(0, sizes))
    with pytest.raises(ValueError, match=r"turns 1 tensor\(s\) into 2, but the rule names 1"):
        rule("wte.weight", "token_embd.weight", Tie())
    with pytest.raises(ValueError, match="needs more than 2 tensor"):
        rule("wte.weight", ("emb", "head"), Tie(), At(2, Transpose()))
    with pytest.raises(ValueError, match=r"Concat\(dim=0\) takes 3 tensor\(s\), not 2"):
        rule(("q", "k"), "qk", Concat(0, sizes))
    # the chains the families use are accepted: n -> 1, 1 -> 2 then one of the two, no ops
    rule(("q", "k", "v"), "qkv", Concat(0, sizes))
    rule("wte.weight", ("emb", "head"), Tie(), At(1, Transpose()))
    rule("a", "a")


def test_a_split_that_does_not_fit_names_the_fused_tensor():
    op = Concat(0, lambda c: [8, 4, 4])
    names = (("blk.0.attn_qkv.weight",), ("q.weight", "k.weight", "v.weight"))
    with pytest.raises(SlimportError, match=r"blk\.0\.attn_qkv\.weight -> q\.weight, k\.weight, "
                       r"v\.weight: Split\(dim=0\) failed on shape\(s\) \(15, 5\): cannot split"):  # fmt: skip
        run_ops((op,), [torch.randn(15, 5)], {}, inverse=True, names=names)


def test_a_name_table_row_names_every_dialect_and_its_bias_is_spelled_like_its_weight():
    # the pairs the dialects use: HF/GGUF, Keras Dense and TFConv1D, Keras and MindSpore LayerNorm
    assert [bias_of(n) for n in ("a.weight", "a/kernel:0", "a/weight:0", "a/gamma:0", "a.gamma")] == [
        "a.bias", "a/bias:0", "a/bias:0", "a/beta:0", "a.beta"]  # fmt: skip
    with pytest.raises(ValueError, match="does not end like a weight"):
        bias_of("model.embed_tokens.embedding_table")
    row = Kind("a.weight", (4, 2), ("b.weight",), bias=True)
    assert [t.name for t in hub_of((row,), ("mindspore",))] == ["a.weight", "a.bias"]
    assert hub_of((row,), ("mindspore",))[1].shape == (4,)
    with pytest.raises(ValueError, match=r"table row a\.weight: 1 names for dialects"):
        hub_of((row,), ("mindspore", "gguf"))
