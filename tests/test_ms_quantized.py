"""Quantized models leave torch: a compressed-tensors folder reads as the float model it computes
(its integers dequantized, exactly as QuantLinear computes them), so MindSpore and every export
take it; `from_pretrained(..., quantization_config=...)` quantizes on the way in."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from ms_testing import maxdiff
from safetensors.torch import load_file
from transformers import AutoTokenizer

from slimport import api
from slimport.compress import api as quant_api
from slimport.compress.quant.compressed import load_quantized
from slimport.compress.quant.config import QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.errors import SlimportError
from slimport.runtime.mindspore.auto import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

SENTENCES = [
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "neither as funny nor as moving as it wants to be",
    "an instant classic",
]


@pytest.fixture(scope="module")
def sst2_w4(sst2_classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2-w4") / "q"
    quant_api.quantize(sst2_classifier, out, progress=False, bits=4, group_size=128)
    return out


def _torch_logits(model, enc) -> np.ndarray:
    with torch.no_grad():
        return model(**enc).logits.numpy()


def _ms_logits(model, enc) -> np.ndarray:
    out = model(*(ms.Tensor(enc[k].numpy()) for k in ("input_ids", "attention_mask")))
    return out.logits.asnumpy()


def test_w4_classifier_runs_in_mindspore_as_in_torch(sst2_w4, sst2_classifier):
    enc = AutoTokenizer.from_pretrained(sst2_classifier)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    reference, _ = load_quantized(sst2_w4)  # torch, QuantLinear modules
    ms_model = AutoModelForSequenceClassification.from_pretrained(sst2_w4)
    d = maxdiff(_ms_logits(ms_model, enc), _torch_logits(reference, enc))
    print(f"\nMiniLM SST-2 W4 g128 in MindSpore vs torch (quantized both): logits max|Δ| {d:.2e}")
    assert d <= 1e-5
    assert any(
        "dequantized from compressed-tensors pack-quantized" in n
        for n in ms_model.load_report.notes
    )


def test_quantization_config_quantizes_on_the_way_in(sst2_classifier, tmp_path):
    enc = AutoTokenizer.from_pretrained(sst2_classifier)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    config = QuantizationConfig(bits=8)
    ms_model = AutoModelForSequenceClassification.from_pretrained(
        sst2_classifier, from_pt=True, quantization_config=config
    )
    quant_api.quantize(sst2_classifier, tmp_path / "q", recipe=config, progress=False)
    reference, _ = load_quantized(tmp_path / "q")
    assert maxdiff(_ms_logits(ms_model, enc), _torch_logits(reference, enc)) <= 1e-5
    assert (
        ms_model.quantization_report["quantized_linears"] == 37
    )  # 6 layers x 6 + pooler; classifier kept
    float_model = AutoModelForSequenceClassification.from_pretrained(sst2_classifier)
    assert (
        maxdiff(_ms_logits(ms_model, enc), _ms_logits(float_model, enc)) > 1e-4
    )  # it did quantize


def test_smollm2_w4_runs_in_mindspore_as_in_torch(smollm2_hf, tmp_path):
    out = tmp_path / "w4"
    quant_api.quantize(smollm2_hf, out, progress=False, bits=4, group_size=64, symmetric=False)
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    ids = tok(["The capital of France is", "Quantization keeps"], padding=True, return_tensors="pt")
    reference, _ = load_quantized(out)
    with torch.no_grad():
        ref = reference(input_ids=ids.input_ids).logits.numpy()
    ours = AutoModelForCausalLM.from_pretrained(out)(ms.Tensor(ids.input_ids.numpy())).logits
    d = maxdiff(ours, ref)
    print(f"\nSmolLM2 W4 g64 asym in MindSpore vs torch (quantized both): logits max|Δ| {d:.2e}")
    assert d <= 1.5e-4  # the fp32 bound of the float model (test_ms_llama): same arithmetic
    assert (ours.asnumpy().argmax(-1) == ref.argmax(-1)).all()


def test_a_quantized_folder_converts_to_its_dequantized_float_weights(sst2_w4, tmp_path):
    api.convert(sst2_w4, tmp_path / "float", to="hf", progress=False)
    written = load_file(tmp_path / "float" / "model.safetensors")
    reference, _ = load_quantized(sst2_w4)
    quantized = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 37
    for name, m in quantized.items():
        assert torch.equal(written[f"{name}.weight"], m.weight), name
    assert not any(k.endswith(("weight_packed", "weight_scale")) for k in written)


def test_activation_quantized_folders_are_refused_with_the_way_out(sst2_classifier, tmp_path):
    quant_api.quantize(
        sst2_classifier, tmp_path / "w8a8", progress=False, bits=8, activations="dynamic"
    )
    with pytest.raises(SlimportError, match="activations are quantized") as e:
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "w8a8")
    assert "load_quantized" in e.value.hint


def test_quantizing_an_already_quantized_model_is_refused(sst2_w4):
    with pytest.raises(SlimportError, match="already quantized"):
        AutoModelForSequenceClassification.from_pretrained(sst2_w4, quantization_config={"bits": 8})
