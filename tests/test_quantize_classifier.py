"""Quantizing a real classifier (MiniLM fine-tuned on SST-2): accuracy cost on the 872 dev sentences.

Calibration uses SST-2 *train* sentences only (256, seed 0); the dev set is never seen before
evaluation. benchmarks/quant_accuracy.py prints the observer x protect-classifier table.
"""

from __future__ import annotations

import pytest

from slimport.compress import api
from slimport.compress.quant.compressed import load_quantized
from slimport.evaluate.classification import sst2_accuracy


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
    model, _ = load_quantized(out)
    result = sst2_accuracy(model, tok, dev, reference=fp32)
    print(
        f"{options}: accuracy {result['accuracy']:.4f} (fp32 {fp32['accuracy']:.4f}), agreement {result['agreement']:.4f}"
    )
    return result


def test_w8a8_costs_at_most_half_a_point_and_agrees_99_percent(
    sst2, sst2_classifier, shared, tmp_path
):
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2,
        sst2_classifier,
        shared,
        tmp_path / "w8a8",
        bits=8,
        activations="static",
        observer="mse",
    )
    assert r["accuracy"] >= fp32 - 0.005
    assert r["agreement"] >= 0.99


def test_w4_g128_gptq_weight_only_costs_at_most_1_5_points(sst2, sst2_classifier, shared, tmp_path):
    fp32 = sst2[2]["accuracy"]
    r = _quantized_accuracy(
        sst2, sst2_classifier, shared, tmp_path / "w4", bits=4, group_size=128, method="gptq"
    )
    assert r["accuracy"] >= fp32 - 0.015


def test_the_classifier_head_is_protected_by_default(sst2_classifier, shared, tmp_path):
    import json

    out = tmp_path / "w8"
    report = api.quantize(sst2_classifier, out, bits=8, progress=False)
    assert report["protected_linears"] == ["classifier"]
    assert (
        "classifier"
        in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    )
