"""Quantizing a real classifier (MiniLM fine-tuned on SST-2): accuracy cost on the 872 dev sentences.

Calibration uses SST-2 *train* sentences only (256, seed 0); the dev set is never seen before
evaluation. benchmarks/quant_accuracy.py prints the observer x protect-classifier table.
"""

from __future__ import annotations

import pytest

from slimport.compress import api
from slimport.compress.quant.compressed import load_simulated
from slimport.evaluate.classification import sst2_accuracy

# Bounds, and the CPU spread they leave room for. One dev sentence is 1/872 = 0.11 points, and
# which sentences flip under 8-bit rounding depends on the CPU's float kernels. W8A8 static +
# SmoothQuant, agreement with fp32 (accuracy drop): 0.9943 (0.11 points) on the Xeon (AVX-512)
# this was written on, with 1 or 2 threads; 0.9908 (0.23) with torch forced to its AVX2 kernels
# there (ATEN_CPU_CAPABILITY=avx2); 0.9874 (0.35) on an AMD EPYC (AVX2, issue #12). A spread
# of 0.7 points in agreement and 0.25 in accuracy; dynamic W8A8 and static mse did not move
# (0.9966 and 0.9885 under both kernel sets). The bounds sit below the worst measured value
# by more than that spread (agreement 0.98: 0.74 points under the AMD run; a drop of at most
# 1 point: 0.65 points of room), so they catch a broken quantizer (tens of points), not a
# kernel's last bit. BENCHMARKS.md has the product numbers.
W8A8_MIN_AGREEMENT = 0.98
W8A8_MAX_DROP = 0.01
W4_MAX_DROP = 0.015


@pytest.fixture(scope="module")
def sst2(shared, sst2_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sst2_classifier)
    fp32 = AutoModelForSequenceClassification.from_pretrained(sst2_classifier)
    dev = shared / "data/sst2/dev.tsv"
    return tok, dev, sst2_accuracy(fp32, tok, dev)


def _quantized_accuracy(sst2, classifier, shared, out, **options) -> dict:
    tok, dev, fp32 = sst2
    api.quantize(
        classifier, out, progress=False, calib_data=str(shared / "data/sst2/train.tsv"),
        num_samples=256, seq_len=128, **options,
    )  # fmt: skip
    model, _ = load_simulated(out)
    result = sst2_accuracy(model, tok, dev, reference=fp32)
    print(
        f"{options}: accuracy {result['accuracy']:.4f} (fp32 {fp32['accuracy']:.4f}), agreement {result['agreement']:.4f}"
    )
    return result


def test_w8a8_dynamic_costs_under_a_point_and_agrees_98_percent(
    sst2, sst2_classifier, shared, tmp_path
):
    """Measured: accuracy -0.11 points, agreement 0.9966 (AVX-512 and AVX2 kernels alike)."""
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2, sst2_classifier, shared, tmp_path / "w8a8", bits=8, activations="dynamic"
    )
    assert r["accuracy"] >= fp32 - W8A8_MAX_DROP
    assert r["agreement"] >= W8A8_MIN_AGREEMENT


def test_w8a8_static_with_smoothquant_costs_under_a_point(sst2, sst2_classifier, shared, tmp_path):
    """SmoothQuant (alpha 0.8) moves the LayerNorm outputs' outlier channels into the q/k/v and
    FFN-in weights, so one static range per tensor fits. Measured: the spread above, against
    0.9885 without SmoothQuant (mse observer, the slow test below). That gap is inside the CPU
    spread, so no test compares the two here; test_quantize.py does, on SmolLM2's perplexity,
    where the gap is large."""
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2, sst2_classifier, shared, tmp_path / "w8a8sq", bits=8, activations="static",
        observer="percentile", smoothquant=0.8,
    )  # fmt: skip
    assert r["accuracy"] >= fp32 - W8A8_MAX_DROP
    assert r["agreement"] >= W8A8_MIN_AGREEMENT


@pytest.mark.slow  # 265-486 s on the busy 2-core machine (the mse grid search); the SmoothQuant
# test keeps a static W8A8 real-model check in CI
def test_w8a8_static_costs_under_a_point(sst2, sst2_classifier, shared, tmp_path):
    """Static per-tensor activation ranges alone (mse observer). Measured: accuracy 0.00 points
    (+0.23 with AVX2 kernels), agreement 0.9885 under both (98.4-98.9% on the full classifier:
    BENCHMARKS.md)."""
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2, sst2_classifier, shared, tmp_path / "w8a8", bits=8, activations="static",
        observer="mse",
    )  # fmt: skip
    assert r["accuracy"] >= fp32 - W8A8_MAX_DROP
    assert r["agreement"] >= W8A8_MIN_AGREEMENT


@pytest.mark.slow  # 192 s on the busy 2-core machine; test_quantize.py keeps W4 GPTQ (SmolLM2) in CI
def test_w4_g128_gptq_weight_only_costs_at_most_1_5_points(sst2, sst2_classifier, shared, tmp_path):
    """Measured: accuracy -0.23 points, agreement 0.9885 (AVX-512 and AVX2 kernels alike): 1.27
    points of room."""
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2, sst2_classifier, shared, tmp_path / "w4", bits=4, group_size=128, method="gptq"
    )
    assert r["accuracy"] >= fp32 - W4_MAX_DROP


def test_the_classifier_head_is_protected_by_default(sst2_classifier, shared, tmp_path):
    import json

    out = tmp_path / "w8"
    report = api.quantize(sst2_classifier, out, bits=8, progress=False)
    assert report["protected_linears"] == ["classifier"]
    assert (
        "classifier"
        in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    )


def test_static_ranges_come_from_the_sentences_not_from_their_padding(
    sst2_classifier, shared, tmp_path
):
    """Calibration batches are padded on the right (BERT's positions stay those of the bare
    sentence, whatever side the tokenizer pads by default) and padding positions are left out of
    every statistic: the same sentences one per batch give the same activation ranges."""
    from safetensors.torch import load_file

    from slimport.compress import pipeline
    from slimport.compress.calibration import calibration_inputs
    from slimport.io.hf import load_tokenizer

    config = api.make_config(
        bits=8, activations="static", calib_data=str(shared / "data/sst2/train.tsv"),
        num_samples=32, seq_len=128,
    )  # fmt: skip
    tok = load_tokenizer(sst2_classifier)
    assert tok.padding_side == "left"  # the generation default, which must not leak in here
    batched = calibration_inputs(tok, config.calib_data, config, causal=False)
    assert all(b["attention_mask"][:, 0].all() for b in batched)
    assert any(not b["attention_mask"].all() for b in batched)  # there is padding to leave out
    single = [
        {k: v[i : i + 1, : int(b["attention_mask"][i].sum())] for k, v in b.items()}
        for b in batched
        for i in range(len(b["input_ids"]))
    ]

    def input_scales(calibration, out):
        pipeline.quantize(sst2_classifier, out, config, calibration, progress=False)
        tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        return {k: v for k, v in tensors.items() if k.endswith("input_scale")}

    a, b = input_scales(batched, tmp_path / "batched"), input_scales(single, tmp_path / "single")
    assert a.keys() == b.keys() and len(a) == 6 * 6 + 1  # every block Linear and the pooler
    later = max(abs(float(a[k]) / float(b[k]) - 1) for k in a if ".layer.0." not in k)
    print(f"\nstatic ranges batched vs one sentence per batch, blocks 1-5: max rel {later:.2e}")
    for k in a:
        # block 0 sees identical inputs (with padding in, its ranges move by percents). Later
        # blocks inherit batched attention's last-bit rounding, which static quantization
        # carries across rounding boundaries: measured 0.11% with these 32 sentences (AVX-512
        # or AVX2 kernels), up to 1.6% with 64.
        rel = 1e-5 if ".layer.0." in k else 5e-2
        assert abs(float(a[k]) - float(b[k])) <= rel * float(b[k]), k
