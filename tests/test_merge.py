"""Model merging (issue #16): the formulas on hand-computed examples, whole checkpoints merged
tensor by tensor across formats, and every way the input can be wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slimport import api, arch
from slimport.cli import main
from slimport.compress.merge import METHODS, drop, merge, slerp, task_merge, trim
from slimport.errors import SlimportError
from slimport.io import safetensors
from slimport.io.auto import open_checkpoint
from slimport.io.base import Ready

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}  # fmt: skip


def tiny(folder: Path, seed: int, config: dict | None = None, edit=None) -> Path:
    """A random 2-layer Llama HF folder (weights from `seed`); `edit(tensors)` may alter it."""
    config = config or CONFIG
    folder.mkdir(parents=True)
    family, cfg = arch.resolve(config, "test")
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen) for n, s in family.hub_tensors(cfg).items()}
    if edit:
        edit(tensors)
    safetensors.write(folder / "model.safetensors", [Ready(n, t) for n, t in tensors.items()])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.load(n) for n in ckpt.names()}


@pytest.fixture
def ab(tmp_path) -> tuple[Path, Path]:
    return tiny(tmp_path / "a", 1), tiny(tmp_path / "b", 2)


def bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.view(torch.int32), y.view(torch.int32))


# ---- the formulas ----


def test_slerp_at_the_ends_returns_the_inputs_bit_exactly():
    v0, v1 = torch.randn(7, 5), torch.randn(7, 5)
    v0[0, 0] = -0.0  # (1-t)*v0 + t*v1 would turn it into +0.0
    assert slerp(0.0, v0, v1)[0] is v0 and slerp(1.0, v0, v1)[0] is v1


def test_slerp_follows_the_great_circle_between_orthogonal_vectors():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    out, fell_back = slerp(1 / 3, v0, v1)  # 30 degrees along a quarter circle of radius 2
    assert not fell_back
    assert torch.allclose(out, torch.tensor([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]))


def test_slerp_of_nearly_parallel_vectors_interpolates_linearly():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = v0 * 3 + 1e-4
    out, fell_back = slerp(0.25, v0, v1)
    assert fell_back and torch.allclose(out, 0.75 * v0 + 0.25 * v1)


def test_ties_on_a_hand_computed_example():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])  # trimmed at density 0.5: [3, 0, 0, 2]
    b = torch.tensor([-1.0, -4.0, 0.2, 1.0])  # trimmed: [0, -4, 0, 0] (|-1| = |1|: topk keeps one)
    b[0] = -0.9  # no tie: trimmed [0, -4, 0, 1]
    out = task_merge(base, [a, b], [1.0, 1.0], METHODS["ties"], density=0.5)
    # elected signs: +, -, +(0), +; disjoint means: 3/1, -4/1, 0, (2+1)/2
    assert torch.equal(out, torch.tensor([3.0, -4.0, 0.0, 1.5]))


def test_ties_sign_election_uses_summed_magnitude_not_counts():
    base = torch.ones(1)
    deltas = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    out = task_merge(base, [base + d for d in deltas], [1, 1, 1], METHODS["ties"], density=1.0)
    assert torch.equal(out, torch.tensor([1.0 - 5.0]))  # two + votes lose to one large -


def test_task_arithmetic_is_base_plus_scaled_task_vectors():
    base, a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])
    out = task_merge(base, [a, b], [0.5, 2.0], METHODS["task_arithmetic"])
    assert torch.equal(out, torch.tensor([1.0 + 0.5 * 1, 2.0 + 2.0 * 2]))


def test_trim_keeps_the_largest_magnitudes():
    d = torch.tensor([[0.1, -3.0], [2.0, -0.2]])
    assert torch.equal(trim(d, 0.5), torch.tensor([[0.0, -3.0], [2.0, -0.0]]))


def test_dare_drops_at_random_and_rescales_the_kept():
    d = torch.arange(1.0, 10001.0)
    out = drop(d, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], d[kept] * 4)  # 1 / density = 1 / (1 - p)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = drop(d, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_dare_linear_on_a_hand_computed_example():
    base, x = torch.zeros(6), torch.arange(1.0, 7.0)
    mask = torch.bernoulli(torch.full((6,), 0.5), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    out = task_merge(base, [x], [1.0], METHODS["dare_linear"], 0.5, generators=[gen])
    assert torch.equal(out, x * mask * 2)


# ---- whole checkpoints ----


def test_linear_merge_is_the_weighted_average(ab, tmp_path):
    a, b = ab
    report = merge([a, b], tmp_path / "out", "linear", weights=[1.0, 3.0], progress=False)
    wa, wb, out = weights(a), weights(b), weights(tmp_path / "out")
    assert set(out) == set(wa) and report["merge"]["tensors"] == len(wa)
    for n in wa:
        assert torch.allclose(out[n], (wa[n] + 3 * wb[n]) / 4, atol=1e-6, rtol=0), n
    unnormalized = merge(
        [a, b], tmp_path / "sum", weights=[1.0, 3.0], normalize=False, progress=False
    )
    assert unnormalized["merge"]["normalize"] is False
    assert torch.allclose(weights(tmp_path / "sum")[n], wa[n] + 3 * wb[n], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_merge_at_the_ends_is_an_input(ab, tmp_path, t):
    a, b = ab
    merge([a, b], tmp_path / "out", "slerp", t=t, progress=False)
    want, got = weights(a if t == 0 else b), weights(tmp_path / "out")
    assert all(bits_equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize(
    "method, options, base",
    [("linear", {"weights": [0.3, 0.7]}, None), ("slerp", {"t": 0.37}, None),
     ("task_arithmetic", {"weights": [0.5, 0.5]}, "other"),
     # sparsified task vectors of A over another base are no longer A - base: use A as base
     ("ties", {"density": 0.3}, "itself"), ("dare_ties", {"density": 0.5}, "itself"),
     ("dare", {"density": 0.5}, "itself")],
)  # fmt: skip
def test_merging_a_model_with_itself_gives_it_back(tmp_path, method, options, base):
    a = tiny(tmp_path / "a", 1)
    if base:
        options = {**options, "base": a if base == "itself" else tiny(tmp_path / "base", 9)}
    report = merge([a, a], tmp_path / "out", method, progress=False, **options)
    got, want = weights(tmp_path / "out"), weights(a)
    if base == "other":  # base + 0.5 (A - base) + 0.5 (A - base): A up to rounding
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-7), n
    else:  # every tensor equal in all inputs: returned unchanged
        assert all(bits_equal(got[n], want[n]) for n in want)
        assert report["merge"]["stats"]["identical"] == len(want)


def test_ties_of_a_model_with_itself_over_another_base_is_the_trimmed_task_vector(tmp_path):
    a, base = tiny(tmp_path / "a", 1), tiny(tmp_path / "base", 9)
    merge([a, a], tmp_path / "out", "ties", base=base, density=1.0, progress=False)
    got, wa = weights(tmp_path / "out"), weights(a)
    for n in wa:  # density 1 keeps everything; the disjoint mean of (d, d) is d
        assert torch.allclose(got[n], wa[n], atol=1e-6, rtol=0), n


def test_inputs_are_streamed_one_tensor_at_a_time(ab, tmp_path, monkeypatch):
    import slimport.compress.merge as m

    reads = []

    def logged_load(path):
        model = real_load(path)
        inner = model.source.loader
        model.source.loader = lambda n: reads.append((str(path), n)) or inner(n)
        return model

    real_load = m.load
    monkeypatch.setattr(m, "load", logged_load)
    merge(list(ab), tmp_path / "out", "linear", progress=False)
    # tensor i of A, tensor i of B, then tensor i+1: never a whole model read ahead
    assert len(reads) == 2 * len(weights(ab[0]))
    for (pa, na), (pb, nb) in zip(reads[::2], reads[1::2], strict=True):
        assert (pa, pb) == (str(ab[0]), str(ab[1])) and na == nb


def test_dare_is_reproducible_for_a_seed(ab, tmp_path):
    a, b = ab
    base = tiny(tmp_path / "base", 9)
    for name, seed in (("x", 4), ("y", 4), ("z", 5)):
        merge([a, b], tmp_path / name, "dare_ties", base=base, seed=seed, progress=False)
    x, y, z = (weights(tmp_path / n) for n in "xyz")
    assert all(torch.equal(x[n], y[n]) for n in x)
    assert not all(torch.equal(x[n], z[n]) for n in x)


@pytest.mark.parametrize("to, options", [("mindspore", {}), ("gguf", {"gguf_type": "f32"})])
def test_merging_across_formats_reads_hub_names(ab, tmp_path, to, options):
    a, _ = ab
    other = tmp_path / f"a-{to}"
    api.convert(a, other, to=to, options=options, progress=False)
    merge([a, other], tmp_path / "out", "slerp", t=0.5, progress=False)
    got, want = weights(tmp_path / "out"), weights(a)
    assert all(bits_equal(got[n], want[n]) for n in want)


def test_the_output_can_be_written_in_another_layout(ab, tmp_path):
    a, b = ab
    report = merge([a, b], tmp_path / "out", "linear", to="mindspore", progress=False)
    assert report["target"] == "mindspore" and (tmp_path / "out" / "model.ckpt").is_file()
    back = api.load(tmp_path / "out")
    wa, wb = weights(a), weights(b)
    for n, p in back.hub.items():
        assert torch.allclose(p.compute(), (wa[n] + wb[n]) / 2, atol=1e-6, rtol=0), n
    back.source.close()


def test_bfloat16_models_merge_in_float32_and_stay_bfloat16(tmp_path):
    def bf16(ts):
        for n in ts:
            ts[n] = ts[n].to(torch.bfloat16)

    a, b = tiny(tmp_path / "a", 1, edit=bf16), tiny(tmp_path / "b", 2, edit=bf16)
    merge([a, b], tmp_path / "out", "linear", progress=False)
    got, wa, wb = weights(tmp_path / "out"), weights(a), weights(b)
    for n in wa:
        want = ((wa[n].float() + wb[n].float()) / 2).to(torch.bfloat16)
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want), n


def test_cli_merges_and_summarizes(ab, tmp_path, capsys):
    a, b = ab
    assert (
        main(["merge", str(a), str(b), str(tmp_path / "out"), "--method", "slerp", "--t", "0"]) == 0
    )
    out = capsys.readouterr().out
    assert "merged 2 model(s) with slerp" in out and "tensors" in out
    assert all(bits_equal(x, weights(a)[n]) for n, x in weights(tmp_path / "out").items())


# ---- bad input: one clear error, nothing written ----


def _refused(tmp_path, models, needle, **kw):
    out = tmp_path / "out"
    with pytest.raises(SlimportError, match=needle):
        merge(models, out, progress=False, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_different_architectures_are_refused(ab, tmp_path):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 16,
            "n_layer": 1, "n_head": 2, "vocab_size": 64, "n_positions": 32}  # fmt: skip
    _refused(tmp_path, [ab[0], tiny(tmp_path / "g", 3, gpt2)], "different architectures")


def test_different_shapes_are_refused(ab, tmp_path):
    wider = {**CONFIG, "intermediate_size": 48}
    _refused(
        tmp_path,
        [ab[0], tiny(tmp_path / "w", 3, wider)],
        r"mlp\.gate_proj\.weight: \[32, 16\] vs \[48, 16\]",
    )


def test_missing_tensors_are_refused(ab, tmp_path):
    deeper = {**CONFIG, "num_hidden_layers": 3}
    _refused(tmp_path, [ab[0], tiny(tmp_path / "d", 3, deeper)], r"extra .*model\.layers\.2\.")


@pytest.mark.parametrize(
    "kw, needle",
    [({"method": "linear", "weights": [1.0]}, "1 value.*for 2 model"),
     ({"method": "slerp", "t": 1.5}, "--t 1.5 is outside"),
     ({"method": "slerp", "t": -0.1}, "outside"),
     ({"method": "ties", "density": 0.0, "base": "B"}, "--density 0 is outside"),
     ({"method": "dare", "density": 1.2, "base": "B"}, "--density 1.2 is outside"),
     ({"method": "ties"}, "needs --base"),
     ({"method": "task_arithmetic"}, "needs --base"),
     ({"method": "dare_ties"}, "needs --base"),
     ({"method": "linear", "base": "B"}, "--base applies to"),
     ({"method": "linear", "t": 0.5}, "--t applies to slerp"),
     ({"method": "slerp", "weights": [1, 1]}, "takes --t"),
     ({"method": "linear", "weights": [1.0, -1.0]}, "sum to 0"),
     ({"method": "linear", "weights": [1.0, float("nan")]}, "finite"),
     ({"method": "average"}, "unknown --method 'average'"),
     ({"method": "linear", "to": "onnx"}, "unknown --to")],
)  # fmt: skip
def test_bad_options_are_refused(ab, tmp_path, kw, needle):
    if kw.get("base") == "B":
        kw = {**kw, "base": tiny(tmp_path / "base", 9)}
    _refused(tmp_path, list(ab), needle, **kw)


def test_slerp_needs_two_models(ab, tmp_path):
    _refused(tmp_path, [*ab, ab[0]], "exactly two models", method="slerp")


def test_differing_integer_buffers_cannot_be_merged():
    from slimport.compress.merge import Options, merge_tensor

    opts = Options("linear", [1.0, 1.0], None, None, None, 0)
    stats = {"identical": 0, "lerp_fallback": 0}
    ids = torch.arange(8)
    assert torch.equal(merge_tensor("position_ids", [ids, ids.clone()], None, opts, stats), ids)
    with pytest.raises(SlimportError, match="'position_ids' is not floating point"):
        merge_tensor("position_ids", [ids, ids.flip(0)], None, opts, stats)
