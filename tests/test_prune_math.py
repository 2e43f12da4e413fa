"""The pruning algorithms against their definitions: masks have exactly the sparsity / N:M
pattern asked for; SparseGPT equals a brute-force OBS sweep (one weight at a time, full inverse
Hessians of the columns still to go); Wanda's score is |W| * ||X||_2 per output row; GPTQ after
pruning keeps the pruned weights at exactly zero."""

from __future__ import annotations

import pytest
import torch

from slimport.compress.prune import masks
from slimport.compress.prune.sparsegpt import factor, sparsegpt
from slimport.compress.quant.config import QuantArgs
from slimport.compress.quant.gptq import gptq


def _hessian(cols: int, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x[:, 1] *= 4  # uneven channels make the Hessian matter
    return 2.0 / tokens * x.T @ x


def _weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_layer_and_row_masks_prune_exactly_the_fraction_asked(sparsity):
    s = torch.rand(24, 40, generator=torch.Generator().manual_seed(0))
    assert int(masks.layer_mask(s, sparsity).sum()) == round(24 * 40 * sparsity)
    per_row = masks.row_mask(s, sparsity).sum(1)
    assert per_row.tolist() == [round(40 * sparsity)] * 24
    # and they are the lowest scores
    m = masks.layer_mask(s, sparsity)
    if sparsity > 0:
        assert s[m].max() <= s[~m].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_have_n_zeros_in_every_group_of_m(n, m):
    s = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    mask = masks.nm_mask(s, n, m)
    assert (mask.reshape(16, -1, m).sum(-1) == n).all()


def _obs_reference(w, H, damp, sparsity=None, nm=None, block_size=None):
    """Brute force: each row, columns left to right; at column j the inverse Hessian of the
    columns j.. is inverted afresh; a pruned weight is removed with the OBS update
    dw = -w_j / [Hj^-1]_00 * Hj^-1[0, :]. The mask is picked as the algorithm says, from the
    current weights: w^2 / [Hj^-1]_00 per block of columns (unstructured) or per group of M."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    rows, cols = w.shape
    W = w.clone()
    inv00 = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)])
    mask = torch.zeros_like(W, dtype=torch.bool)
    bs = block_size or cols
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        if nm is None:
            score = W[:, i1:i2].square() / inv00[i1:i2]
            k = round(rows * i2 * sparsity) - round(rows * i1 * sparsity)
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[torch.argsort(score.reshape(-1), stable=True)[:k]] = True
            mask[:, i1:i2] = block.reshape(score.shape)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                score = W[:, j : j + nm[1]].square() / inv00[j : j + nm[1]]
                idx = torch.argsort(score, dim=1, stable=True)[:, : nm[0]]
                mask[:, j : j + nm[1]].scatter_(1, idx, True)
            Hinv = torch.linalg.inv(H[j:, j:])
            for r in range(rows):
                if mask[r, j]:
                    W[r, j:] -= W[r, j] / Hinv[0, 0] * Hinv[0, :]
    W[mask] = 0.0
    return W, mask


@pytest.mark.parametrize(
    "sparsity,nm,block_size",
    [(0.5, None, 8), (0.5, None, 3), (0.25, None, 4), (None, (2, 4), 4), (None, (2, 4), 8)],
)
def test_sparsegpt_equals_brute_force_obs(sparsity, nm, block_size):
    w, H = _weight(8, 8), _hessian(8)
    U = factor(H, damp=0.01, dtype=torch.float64)
    s = nm[0] / nm[1] if nm else sparsity
    got = sparsegpt(w, U, s, nm, block_size=block_size)
    ref_w, ref_mask = _obs_reference(w, H, 0.01, sparsity, nm, block_size)
    assert torch.equal(got.mask, ref_mask)
    torch.testing.assert_close(got.weight, ref_w, rtol=0, atol=1e-10)
    assert int(got.mask.sum()) == round(64 * s)


def test_sparsegpt_beats_magnitude_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64)  # correlated inputs, as in LMs
    x = torch.randn(256, 64, generator=g, dtype=torch.float64) @ mix
    w, H = _weight(32, 64), 2.0 / 256 * x.T @ x
    U = factor(H, damp=0.01, dtype=torch.float64)
    ours = sparsegpt(w, U, 0.5, block_size=16).weight
    mag = w.masked_fill(masks.layer_mask(w.abs(), 0.5), 0.0)

    def err(v):
        d = w - v
        return float(torch.einsum("ri,ij,rj->", d, H, d))

    assert err(ours) < 0.8 * err(mag)  # measured 0.65


def test_wanda_score_is_weight_times_input_norm_per_row():
    from slimport.compress.capture import Stats
    from slimport.compress.handlers import BlockWork
    from slimport.compress.modifiers import WandaConfig
    from slimport.compress.prune.handlers import wanda

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8, generator=g))
    x = torch.randn(50, 8, generator=g) * torch.arange(1, 9)  # channel norms differ
    w0 = lin.weight.detach().clone()
    st = Stats(sqnorm=x.square().sum(0))
    work = BlockWork(
        None, {"l": lin}, {"l": st}, [], None, None, {"l": {"module": "l", "seconds": 0}}, None
    )
    wanda(WandaConfig(sparsity=0.5), work)
    score = w0.abs() * x.norm(dim=0)
    # the 4 lowest scores of each row are pruned (ties impossible with random data)
    expect = torch.zeros(4, 8, dtype=torch.bool)
    expect.scatter_(1, score.argsort(1)[:, :4], True)
    assert torch.equal(work.masks["l"], expect)
    assert torch.equal(lin.weight == 0, expect)
    assert torch.equal(lin.weight[~expect], w0[~expect])


def test_gptq_with_a_mask_keeps_pruned_weights_at_zero():
    w, H = _weight(16, 32).float(), _hessian(32).float()
    mask = masks.nm_mask(w.abs(), 2, 4)
    w = w.masked_fill(mask, 0.0)
    args = QuantArgs(4, False, "group", 16)
    q, scale, zero, _ = gptq(w, H, args, mask=mask)
    from slimport.compress.quant import primitives as P

    deq = P.dequantize_tensor(q, args, scale, zero)
    assert (deq[mask] == 0).all()
    free = gptq(w, H, args)  # without the mask GPTQ's error feedback fills the holes
    assert (P.dequantize_tensor(free.q, args, free.scale, free.zero)[mask] != 0).any()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_on_stacked_weights_equals_one_call_each(nm):
    """q/k/v share a Hessian: one stacked sweep, each part with its own sparsity."""
    H = _hessian(16)
    U = factor(H, damp=0.01, dtype=torch.float64)
    ws = [_weight(8, 16, seed=1), _weight(4, 16, seed=2), _weight(6, 16, seed=3)]
    ss = [0.5, 0.5, 0.5] if nm else [0.5, 0.25, 0.75]
    stacked = sparsegpt(ws, U, ss, nm, block_size=8)
    parts = zip(ws, ss, stacked.weight.split([8, 4, 6]), stacked.mask.split([8, 4, 6]), strict=True)
    for w, s, got_w, got_m in parts:
        alone = sparsegpt(w, U, s, nm, block_size=8)
        assert torch.equal(got_m, alone.mask)
        torch.testing.assert_close(got_w, alone.weight, rtol=0, atol=1e-12)
        assert int(got_m.sum()) == round(w.numel() * s)


def test_collect_stops_a_block_once_every_linear_input_is_seen():
    """The calibration pass runs a Llama block only up to down_proj's input: the statistics are
    those of the full pass, and down_proj itself (a quarter of the block's MACs) never runs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from slimport.compress.capture import Batch, Needs, collect, run_block

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=1)  # fmt: skip
    block = LlamaDecoderLayer(cfg, 0).eval()
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(2, 5, 32)
    rope = LlamaRotaryEmbedding(cfg)(x, torch.arange(5)[None])
    inputs = [
        Batch(x, (), {"position_embeddings": rope}),
        Batch(x * 2, (), {"position_embeddings": rope}),
    ]
    calls = []
    block.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    needs = Needs(sqnorm=True, hessian=True)
    early = collect(block, linears, inputs, needs, 0, run_block)
    assert calls == []  # down_proj's input was recorded, its matmul skipped
    full = collect(block, linears, inputs, needs, 0, lambda b, i: run_block(b, i))
    assert len(calls) == 2  # a custom run (AWQ's replay, the tail) is never cut short
    for n in linears:
        assert torch.equal(early[n].sqnorm, full[n].sqnorm), n
        assert early[n].hessian.n == full[n].hessian.n == 20
        assert torch.equal(early[n].hessian.sum, full[n].hessian.sum), n
    assert early["self_attn.k_proj"] is early["self_attn.q_proj"]  # one Stats for one input
