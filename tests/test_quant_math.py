"""The arithmetic of quantization, checked against hand-worked numbers, compressed-tensors, and
slow straightforward reference implementations: integer grids, observers, GPTQ, AWQ,
SmoothQuant and scale folding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimport.compress.quant import awq as awq_mod
from slimport.compress.quant import primitives as P
from slimport.compress.quant.awq import awq_clip, awq_scales
from slimport.compress.quant.config import QuantArgs
from slimport.compress.quant.gptq import Hessian, gptq
from slimport.compress.quant.observers import make_observer, mse_weight_qparams, tail_quantiles
from slimport.compress.quant.scaling import fold_scales
from slimport.compress.quant.smoothquant import smooth_scales
from slimport.errors import SlimportError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors only: on a busy 2-core box, intra-op threads make them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def deq(q, scale, zero, args):
    return P.dequantize(q, P.expand(scale, q.shape, args), P.expand(zero, q.shape, args))


def out_err(w, wq, H) -> float:
    """GPTQ's objective: tr((W-Q) H (W-Q)^T), the layer's output error on the calibration set."""
    d = (w - wq).double()
    return float(torch.trace(d @ H.double() @ d.T))


# ---------------------------------------------------------------- integer grids


GRANULES = [
    QuantArgs(8, True, "tensor"),
    QuantArgs(8, False, "channel"),
    QuantArgs(4, True, "channel"),
    QuantArgs(4, False, "group", 16),
    QuantArgs(3, True, "group", 16),
    QuantArgs(3, False, "tensor"),
    QuantArgs(8, True, "group", 32),
]


@pytest.mark.parametrize("args", GRANULES, ids=str)
def test_round_trip_stays_on_the_grid_within_half_a_step(args):
    x = torch.randn(8, 64, generator=gen()) * 3 + 0.5
    scale, zero = P.qparams(*P.minmax(x, args), args.bits, args.symmetric)
    q = P.quantize_tensor(x, args, scale, zero)
    qmin, qmax = P.qrange(args.bits)
    assert torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
    assert torch.equal(zero, zero.round()) and zero.min() >= qmin and zero.max() <= qmax
    if args.symmetric:
        assert torch.all(zero == 0)
    # every x lies inside its granule's range, so the error is at most half a step (reached at
    # a symmetric positive max: absmax/scale = 127.5 clamps to 127; the slack is float rounding)
    s = P.expand(scale, x.shape, args)
    err = (x - P.fake_quantize(x, args, scale, zero)).abs()
    assert torch.all(err <= s * (0.5 + 1e-4))
    # 0.0 is exactly representable: zero padding and ReLU zeros survive quantization
    assert torch.all(P.fake_quantize(torch.zeros_like(x), args, scale, zero) == 0)


def test_scale_and_zero_point_hand_worked():
    lo, hi = torch.tensor([-1.0]), torch.tensor([3.0])
    # asymmetric 8-bit: scale = (3 - -1) / 255; zero = round(-128 - (-1)/scale) = round(-64.25)
    s, z = P.qparams(lo, hi, 8, symmetric=False)
    assert s.item() == pytest.approx(4 / 255, rel=1e-7) and z.item() == -64
    # x = 3.0 -> 3 * 63.75 - 64 = 127.25 -> 127;  x = -1.0 -> -63.75 - 64 = -127.75 -> -128
    assert P.quantize(torch.tensor([3.0, -1.0, 0.0]), s, z, 8).tolist() == [127, -128, -64]
    # asymmetric 4-bit: scale = 4/15, zero = round(-8 + 3.75) = -4
    s, z = P.qparams(lo, hi, 4, symmetric=False)
    assert s.item() == pytest.approx(4 / 15, rel=1e-7) and z.item() == -4
    # symmetric 8-bit: absmax 3.0 over half the 255 steps
    s, z = P.qparams(lo, hi, 8, symmetric=True)
    assert s.item() == pytest.approx(3 / 127.5, rel=1e-7) and z.item() == 0
    # 3.0 / (3/127.5) = 127.5 -> rounds (half to even) to 128, clamps to 127
    assert P.quantize(torch.tensor([3.0, -3.0]), s, z, 8).tolist() == [127, -128]
    # a range that excludes 0 is widened to include it
    s, z = P.qparams(torch.tensor([1.0]), torch.tensor([2.0]), 8, symmetric=False)
    assert s.item() == pytest.approx(2 / 255, rel=1e-7) and z.item() == -128


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_equal_compressed_tensors(bits, symmetric):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    g = gen(bits + symmetric)
    lo = -torch.rand(16, 4, generator=g) * torch.logspace(-3, 2, 4)
    hi = torch.rand(16, 4, generator=g) * torch.logspace(-3, 2, 4)
    lo[0, 0], hi[1, 1] = 0.5, -0.5  # ranges on one side of zero
    ref_s, ref_z = calculate_qparams(
        lo, hi, QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=8)
    )
    s, z = P.qparams(lo, hi, bits, symmetric)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    assert torch.equal(z, ref_z.float())


# ---------------------------------------------------------------- observers

A8 = QuantArgs(8, True, "tensor")


def test_min_max_observer_finds_the_extremes_across_batches():
    obs = make_observer("min_max", QuantArgs(8, False, "tensor"))
    for lo, hi in [(-1.0, 2.0), (-3.0, 1.0), (-2.0, 4.0)]:
        obs.update(torch.linspace(lo, hi, 101).reshape(1, 101))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-3.0, 4.0)
    s, z = obs.qparams()
    assert s.item() == pytest.approx(7 / 255) and z.item() == round(-128 + 3 / (7 / 255))


def test_ema_observer_hand_computed_over_three_batches():
    obs = make_observer("ema_min_max", A8, decay=0.9)
    for lo, hi in [(-1.0, 2.0), (-3.0, 1.0), (-2.0, 4.0)]:
        obs.update(torch.tensor([lo, 0.0, hi]))
    # batch 1 starts the average; then ema = 0.9 * ema + 0.1 * batch
    # min: -1 -> 0.9*-1 + 0.1*-3 = -1.2 -> 0.9*-1.2 + 0.1*-2 = -1.28
    # max:  2 -> 0.9*2 + 0.1*1 = 1.9   -> 0.9*1.9 + 0.1*4 = 2.11
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(-1.28) and hi.item() == pytest.approx(2.11)
    assert obs.qparams()[0].item() == pytest.approx(2.11 / 127.5)


def test_percentile_observer_on_uniform_data_is_the_quantile():
    obs = make_observer("percentile", A8, percentile=99.0)
    g = gen(1)
    for _ in range(3):
        obs.update(torch.rand(200_000, generator=g) * 2 - 1)  # U(-1, 1)
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(-0.98, abs=0.01) and hi.item() == pytest.approx(
        0.98, abs=0.01
    )


@pytest.mark.parametrize("n", [1, 3, 1000, 12_345, 300_000])
@pytest.mark.parametrize("p", [100.0, 99.99, 99.0, 90.0])
def test_tail_quantiles_equal_torch_quantile_bit_for_bit(n, p):
    x = torch.randn(n, generator=gen(n)) * 3
    expected = torch.quantile(x, torch.tensor([1 - p / 100, p / 100]))
    assert torch.equal(tail_quantiles(x, p), expected)


@pytest.mark.parametrize("name,args", [("mse", QuantArgs(4, True, "tensor")), ("kl", A8)])
def test_clipping_observers_ignore_a_few_huge_outliers(name, args):
    bulk = torch.randn(60_000, generator=gen(2))
    data = torch.cat([bulk, torch.tensor([50.0, -50.0, 48.0, -49.0])])
    obs, ref = make_observer(name, args), make_observer("min_max", args)
    obs.update(data)
    ref.update(data)
    lo, hi = obs.range()
    assert -17.5 < lo.item() < 0 < hi.item() < 17.5  # well inside min-max's +-50

    def bulk_mse(o):
        s, z = o.qparams()
        return float((P.dequantize(P.quantize(bulk, s, z, args.bits), s, z) - bulk).pow(2).mean())

    assert bulk_mse(obs) < 0.5 * bulk_mse(ref)


# ---------------------------------------------------------------- GPTQ


def gptq_reference(w, H, args, damp=0.01, act_order=False, observer="min_max"):
    """Optimal Brain Quantization one column at a time, the textbook way: explicit inverse
    Hessian, OBS weight update, Gaussian elimination of the quantized column from H^-1."""
    W, H = w.double().clone(), H.double().clone()
    cols = W.shape[1]
    grouped = args.granularity == "group"
    g = args.group_size if grouped else cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(ws, a):
        if observer == "mse":
            return mse_weight_qparams(ws, a)
        return P.qparams(*P.minmax(ws, a), a.bits, a.symmetric)

    if not grouped or act_order:
        scale, zero = params(W, args)
    perm = (
        torch.argsort(torch.diag(H), descending=True, stable=True)
        if act_order
        else torch.arange(cols)
    )
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    dyn_s, dyn_z = [], []
    for j in range(cols):
        if grouped and not act_order:
            if j % g == 0:
                s, z = params(W[:, j : j + g], QuantArgs(args.bits, args.symmetric, "channel"))
                s, z = s[:, 0], z[:, 0]
                dyn_s.append(s)
                dyn_z.append(z)
        elif grouped:
            s, z = scale[:, perm[j] // g], zero[:, perm[j] // g]
        else:
            s, z = scale.reshape(-1), zero.reshape(-1)
        Q[:, j] = P.quantize(W[:, j], s, z, args.bits)
        err = (W[:, j] - P.dequantize(Q[:, j], s, z)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    if grouped and not act_order:
        scale, zero = torch.stack(dyn_s, 1), torch.stack(dyn_z, 1)
    return Q[:, torch.argsort(perm)], scale, zero


def correlated_hessian(n_in: int, seed: int = 0, n: int = 256) -> torch.Tensor:
    g = gen(seed)
    x = torch.randn(n, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    x = x * torch.rand(n_in, generator=g) * 3  # uneven channel scales make act_order matter
    h = Hessian(n_in)
    h.add(x.double())
    return h.value().double()


@pytest.mark.parametrize(
    "args,act_order",
    [
        (QuantArgs(4, True, "channel"), False),
        (QuantArgs(4, False, "channel"), True),
        (QuantArgs(3, False, "group", 4), False),  # group qparams from the updated weight
        (QuantArgs(4, True, "group", 4), True),  # static groups
        (QuantArgs(8, False, "tensor"), True),
    ],
    ids=str,
)
def test_gptq_equals_the_textbook_reference_for_any_block_size(args, act_order):
    w = torch.randn(6, 16, generator=gen(3), dtype=torch.float64)
    H = correlated_hessian(16)
    ref_q, ref_s, ref_z = gptq_reference(w, H, args, act_order=act_order)
    for block in (1, 3, 5, 16, 128):
        q, s, z, _ = gptq(w, H, args, block_size=block, act_order=act_order)
        assert torch.equal(q, ref_q.float()), f"block_size {block}"
        torch.testing.assert_close(s, ref_s.float())
        assert torch.equal(z, ref_z.float())


def test_gptq_tiny_layer_block_size_does_not_matter_float32():
    w = torch.randn(4, 8, generator=gen(4))
    H = correlated_hessian(8).float()
    args = QuantArgs(4, True, "channel")
    q1, s1, z1, _ = gptq(w, H, args, block_size=1, act_order=False)
    q8, s8, z8, _ = gptq(w, H, args, block_size=8, act_order=False)
    assert torch.equal(q1, q8) and torch.equal(s1, s8) and torch.equal(z1, z8)
    qmin, qmax = P.qrange(4)
    assert q1.min() >= qmin and q1.max() <= qmax and torch.equal(q1, q1.round())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_without_correlations_is_rtn(act_order):
    """With a diagonal Hessian no column's error can be compensated by another: GPTQ == RTN."""
    w = torch.randn(8, 32, generator=gen(5))
    H = torch.diag(torch.rand(32, generator=gen(6)) + 0.1)
    for args in (QuantArgs(4, True, "channel"), QuantArgs(4, False, "group", 8)):
        q, s, z, _ = gptq(w, H, args, act_order=act_order)
        rq, rs, rz = P.rtn(w, args)
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize(
    "args,act_order",
    [
        (QuantArgs(4, True, "channel"), False),
        (QuantArgs(4, True, "channel"), True),
        (QuantArgs(3, False, "group", 16), False),
        (QuantArgs(4, False, "group", 16), True),
    ],
    ids=str,
)
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(args, act_order):
    w = torch.randn(32, 64, generator=gen(7))
    H = correlated_hessian(64, seed=8).float()
    q, s, z, _ = gptq(w, H, args, act_order=act_order)
    rq, rs, rz = P.rtn(w, args)
    assert out_err(w, deq(q, s, z, args), H) < 0.8 * out_err(w, deq(rq, rs, rz, args), H)


def test_gptq_act_order_groups_are_static_in_original_column_order():
    """act_order + groups: every group's qparams come from the original weight's group, so the
    saved (q, scale, zero) dequantize with the plain [out, groups] layout (no g_idx)."""
    args = QuantArgs(4, False, "group", 8)
    w = torch.randn(16, 32, generator=gen(9))
    H = correlated_hessian(32, seed=10).float()
    assert not torch.equal(torch.argsort(torch.diag(H), descending=True), torch.arange(32))
    q, s, z, _ = gptq(w, H, args, act_order=True)
    _, rs, rz = P.rtn(w, args)
    assert torch.equal(s, rs) and torch.equal(z, rz) and s.shape == (16, 4)
    rtn_wq = P.fake_quantize(w, args, rs, rz)
    assert out_err(w, deq(q, s, z, args), H) < out_err(w, rtn_wq, H)


def test_gptq_dead_input_column_quantizes_to_zero():
    args = QuantArgs(4, False, "channel")
    H = correlated_hessian(16, seed=11).float()
    H[5, :], H[:, 5] = 0, 0  # input 5 never fires on the calibration data
    w = torch.randn(8, 16, generator=gen(12))
    for act_order in (False, True):
        q, s, z, _ = gptq(w, H, args, act_order=act_order)
        wq = deq(q, s, z, args)
        assert torch.all(wq[:, 5] == 0) and torch.isfinite(wq).all()


def test_gptq_mse_weight_observer_uses_the_clipping_search():
    args = QuantArgs(4, True, "channel")
    w = torch.randn(8, 256, generator=gen(13))
    w[:, 0] = 5.0  # one outlier per row: min-max would spend the 4-bit grid on it
    H = correlated_hessian(256, seed=14).float()
    _, s, z, _ = gptq(w, H, args, weight_observer="mse")
    ms, mz = mse_weight_qparams(w, args)
    assert torch.equal(s, ms) and torch.equal(z, mz)
    assert torch.all(s < P.rtn(w, args)[1])


def test_gptq_not_positive_definite_says_raise_damp():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(SlimportError, match="not positive definite") as e:
        gptq(torch.ones(2, 2), H, QuantArgs(4, True, "channel"))
    assert "damp" in e.value.hint


def test_hessian_accumulates_two_over_n_x_xt():
    g = gen(15)
    a, b = torch.randn(2, 5, 6, generator=g), torch.randn(7, 6, generator=g)
    h = Hessian(6)
    h.add(a)
    h.add(b)
    x = torch.cat([a.reshape(-1, 6), b]).double()
    torch.testing.assert_close(h.value(), (2 / 17 * x.T @ x).float())
    with pytest.raises(SlimportError, match="no calibration tokens"):
        Hessian(6).value()
    with pytest.raises(ValueError):
        h.add(torch.randn(3, 5))


# ---------------------------------------------------------------- AWQ


SALIENT = [3, 17, 20, 41]


def salient_inputs(n=512, d=64, seed=16):
    x = torch.randn(n, d, generator=gen(seed))
    x[:, [c for c in SALIENT if c < d]] *= 40  # a few salient channels, as in LLM activations
    return x


def awq_err(x, ws, args, s):
    return sum(
        float((x @ (w - P.fake_quantize(w * s, args, *P.rtn(w * s, args)[1:]) / s).T).pow(2).sum())
        for w in ws
    )


@pytest.mark.parametrize(
    "args", [QuantArgs(4, False, "group", 16), QuantArgs(4, True, "channel")], ids=str
)
@pytest.mark.parametrize("screened", [False, True])
def test_awq_scales_protect_salient_channels(args, screened, monkeypatch):
    if screened:  # the sketch-then-refine path that large layers take
        monkeypatch.setattr(awq_mod, "EXACT_BUDGET", 0)
    x = salient_inputs()
    ws = [torch.randn(32, 64, generator=gen(17)), torch.randn(16, 64, generator=gen(18))]
    s = awq_scales(x, ws, args)
    assert s.shape == (64,) and torch.all(s > 0)
    assert s[SALIENT].min() > s.median()  # salient channels scaled up
    assert awq_err(x, ws, args, s) < 0.8 * awq_err(x, ws, args, torch.ones(64))


def test_awq_scales_never_worse_than_rtn():
    args = QuantArgs(4, False, "group", 16)
    for seed in range(3):
        x = torch.randn(256, 32, generator=gen(seed))  # nothing salient to protect
        ws = [torch.randn(16, 32, generator=gen(seed + 10))]
        s = awq_scales(x, ws, args)
        assert awq_err(x, ws, args, s) <= awq_err(x, ws, args, torch.ones(32))
    # grid point alpha = 0 is exactly s = 1
    x, ws = salient_inputs(), [torch.randn(8, 64, generator=gen(19))]
    assert torch.equal(awq_scales(x, ws, args, grid=1), torch.ones(64))


def test_awq_screened_search_is_still_never_worse_than_rtn(monkeypatch):
    """Large layers screen the grid on a token sketch; the exact re-scoring of the finalists
    (alpha = 0 among them) keeps the guarantee even when the sketch is poor."""
    monkeypatch.setattr(awq_mod, "EXACT_BUDGET", 0)
    monkeypatch.setattr(awq_mod, "SKETCH_ROWS", 1)  # a deliberately terrible sketch
    args = QuantArgs(3, False, "group", 16)
    for seed in range(30):
        x = torch.randn(256, 32, generator=gen(seed)) * torch.rand(32, generator=gen(seed + 20))
        ws = [torch.randn(16, 32, generator=gen(seed + 10))]
        s = awq_scales(x, ws, args)
        assert awq_err(x, ws, args, s) <= awq_err(x, ws, args, torch.ones(32)), seed


@pytest.mark.parametrize("args", GRANULES, ids=str)
def test_awq_fast_fake_quantize_is_primitives_rtn(args):
    w = torch.randn(8, 64, generator=gen(30)) * 2
    assert torch.equal(awq_mod._fake_rtn(w, args), P.fake_quantize(w, args, *P.rtn(w, args)[1:]))


def clip_reference(w, x, args, grid=20, max_shrink=0.5):
    """AutoAWQ's auto_clip, literally: per (row, group), output error over tokens, one r at a time."""
    g = args.group_size
    rows, d = w.shape
    out = w.clone()
    xg = x.reshape(-1, d // g, g)
    for r in range(rows):
        for k in range(d // g):
            wg, xk = w[r, k * g : (k + 1) * g], xg[:, k]
            org = xk @ wg
            best, best_err = wg, None
            for i in range(int(max_shrink * grid)):
                m = wg.abs().max() * (1 - i / grid)
                c = wg.clamp(-m, m)
                qa = QuantArgs(args.bits, args.symmetric, "channel")
                cq = P.fake_quantize(c[None], qa, *P.rtn(c[None], qa)[1:])[0]
                e = float((xk @ cq - org).pow(2).mean())
                if best_err is None or e < best_err:
                    best, best_err = c, e
            out[r, k * g : (k + 1) * g] = best
    return out


def test_awq_clip_equals_the_per_group_search():
    args = QuantArgs(3, False, "group", 8)
    x = salient_inputs(n=64, d=32)
    w = torch.randn(6, 32, generator=gen(20)).double()
    clipped = awq_clip(w, x.double(), args)
    assert torch.equal(clipped, clip_reference(w, x.double(), args))
    assert torch.all(clipped.abs() <= w.abs()) and not torch.equal(clipped, w)


def test_awq_clip_lowers_output_error():
    x = salient_inputs(n=1024)
    w = torch.randn(16, 64, generator=gen(21))
    for args in (
        QuantArgs(4, False, "group", 16),
        QuantArgs(4, True, "channel"),
        QuantArgs(4, True, "tensor"),
    ):
        c = awq_clip(w, x, args)
        e_clip = float((x @ (w - P.fake_quantize(c, args, *P.rtn(c, args)[1:])).T).pow(2).sum())
        e_rtn = float((x @ (w - P.fake_quantize(w, args, *P.rtn(w, args)[1:])).T).pow(2).sum())
        assert e_clip <= e_rtn, args


# ---------------------------------------------------------------- SmoothQuant and folding


def test_smooth_scales_hand_checked():
    act = torch.tensor([4.0, 1.0, 0.0])
    w1, w2 = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-0.25, 1.0, 0.0], [0.5, 0.5, -0.1]])
    # column max |W| over both Linears: [1, 2, 0.5]
    torch.testing.assert_close(
        smooth_scales(act, [w1, w2], 0.5), torch.tensor([2.0, 1 / math.sqrt(2), 1e-5])
    )
    torch.testing.assert_close(smooth_scales(act, [w1, w2], 1.0), torch.tensor([4.0, 1.0, 1e-5]))
    torch.testing.assert_close(smooth_scales(act, [w1, w2], 0.0), torch.tensor([1.0, 0.5, 2.0]))
    # alpha 0.5 balances the two ranges: max|X_j / s_j| == max_i |W_ij * s_j|
    s = smooth_scales(act, [w1, w2], 0.5)[:2]
    torch.testing.assert_close(act[:2] / s, torch.tensor([1.0, 2.0]) * s)
    with pytest.raises(ValueError):
        smooth_scales(act, [torch.ones(2, 4)])


def positive_scales(n, seed=22):
    return torch.exp(torch.randn(n, generator=gen(seed)))  # spread over ~[0.05, 20]


def check_fold(prev, linears, x, compute):
    before = compute(x)
    fold_scales(prev, linears, positive_scales(linears[0].in_features))
    for a, b in zip(before, compute(x), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fold_scales_layernorm_to_linears():
    torch.manual_seed(23)
    ln, q, k = nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(16, 4, bias=False)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    with torch.no_grad():
        check_fold(ln, [q, k], torch.randn(5, 16), lambda x: [q(ln(x)), k(ln(x))])


def test_fold_scales_llama_rmsnorm_to_linears():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(24)
    norm, gate, up = (
        LlamaRMSNorm(16, eps=1e-6),
        nn.Linear(16, 12, bias=False),
        nn.Linear(16, 12, bias=False),
    )
    nn.init.normal_(norm.weight)
    with torch.no_grad():
        check_fold(norm, [gate, up], torch.randn(2, 3, 16), lambda x: [gate(norm(x)), up(norm(x))])


def test_fold_scales_linear_to_linear():
    torch.manual_seed(25)
    v, o = nn.Linear(16, 12), nn.Linear(12, 8)
    with torch.no_grad():
        check_fold(v, [o], torch.randn(4, 16), lambda x: [o(v(x))])


def test_fold_scales_checks_shapes_before_touching_anything():
    ln, lin = nn.LayerNorm(16), nn.Linear(16, 8)
    w0, l0 = ln.weight.detach().clone(), lin.weight.detach().clone()
    with pytest.raises(ValueError):
        fold_scales(ln, [lin, nn.Linear(12, 8)], torch.ones(16) * 2)
    with pytest.raises(ValueError):
        fold_scales(nn.Linear(4, 12), [lin], torch.ones(16) * 2)
    with pytest.raises(ValueError):
        fold_scales(ln, [lin], torch.zeros(16))
    with pytest.raises(ValueError):
        fold_scales(nn.LayerNorm(16, elementwise_affine=False), [lin], torch.ones(16))
    assert torch.equal(ln.weight, w0) and torch.equal(lin.weight, l0)


def test_awq_scales_folded_into_a_block_lower_its_quantized_error():
    """The whole AWQ move on a LayerNorm -> Linear pair: search s, fold it, quantize."""
    torch.manual_seed(26)
    ln, lin = nn.LayerNorm(64), nn.Linear(64, 32)
    args = QuantArgs(4, False, "group", 16)
    with torch.no_grad():
        ln.weight.copy_(torch.ones(64))
        ln.weight[[3, 17, 40]] = 30.0  # the norm makes a few channels salient
        x = torch.randn(256, 64)
        ref = lin(ln(x))
        h = ln(x)

        def quantized_error():
            wq = P.fake_quantize(lin.weight, args, *P.rtn(lin.weight, args)[1:])
            return float((nn.functional.linear(ln(x), wq, lin.bias) - ref).pow(2).sum())

        e_rtn = quantized_error()
        fold_scales(ln, [lin], awq_scales(h, [lin.weight], args))
        torch.testing.assert_close(lin(ln(x)), ref, atol=1e-4, rtol=1e-5)
        assert quantized_error() < 0.8 * e_rtn


@pytest.mark.parametrize(
    "args,act_order",
    [(QuantArgs(4, True, "channel"), False), (QuantArgs(4, False, "group", 4), True)],
    ids=str,
)
def test_gptq_loss_is_the_damped_output_error_of_each_row(args, act_order):
    w = torch.randn(6, 16, generator=gen(16), dtype=torch.float64)
    H = correlated_hessian(16, seed=17)
    q, s, z, loss = gptq(w, H, args, act_order=act_order, damp=0.05)
    D = w - deq(q.double(), s.double(), z.double(), args)
    H_damped = H + 0.05 * H.diagonal().mean() * torch.eye(16, dtype=H.dtype)
    torch.testing.assert_close(loss, ((D @ H_damped) * D).sum(1), rtol=1e-5, atol=1e-9)


def test_gptq_consumes_a_hessian_accumulator_and_leaves_a_tensor_alone():
    x = torch.randn(64, 16, generator=gen(18)) @ torch.randn(16, 16, generator=gen(19))
    h = Hessian(16)
    h.add(x)
    H = h.value()
    kept = H.clone()
    w = torch.randn(8, 16, generator=gen(20))
    first = gptq(w, H, QuantArgs(4, True, "channel"))
    assert torch.equal(H, kept)
    second = gptq(w, h, QuantArgs(4, True, "channel"))
    assert torch.equal(first.q, second.q) and h.sum is None


def test_gptq_of_stacked_weights_equals_one_call_each():
    """Linears sharing an input (q/k/v) are quantized as one matrix: rows are independent."""
    H = correlated_hessian(16, seed=21).float()
    parts = [torch.randn(n, 16, generator=gen(22 + n)) for n in (4, 2, 2)]
    args = QuantArgs(4, False, "group", 8)
    stacked = gptq(parts, H, args)
    one_by_one = [gptq(w, H, args) for w in parts]
    for i, field in enumerate(("q", "scale", "zero", "loss")):
        torch.testing.assert_close(stacked[i], torch.cat([r[i] for r in one_by_one]), msg=field)
