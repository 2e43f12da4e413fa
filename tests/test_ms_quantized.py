"""Quantized models leave torch: in MindSpore a compressed-tensors folder loads with its integers
held (QuantDense, dequantized per call) and computes what torch's QuantLinear computes; every
float export reads it as the float model it computes; `from_pretrained(...,
quantization_config=...)` quantizes on the way in, the seeds' one-liner included."""

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
from slimport.compress.quant.compressed import load_simulated
from slimport.compress.quant.config import QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.errors import SlimportError
from slimport.io.hf import load_tokenizer
from slimport.runtime.mindspore.auto import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from slimport.runtime.mindspore.quantized import QuantDense

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
    reference, _ = load_simulated(sst2_w4)  # torch, QuantLinear modules
    ms_model = AutoModelForSequenceClassification.from_pretrained(sst2_w4)
    d = maxdiff(_ms_logits(ms_model, enc), _torch_logits(reference, enc))
    print(f"\nMiniLM SST-2 W4 g128 in MindSpore vs torch (quantized both): logits max|Δ| {d:.2e}")
    assert d <= 1e-5
    dense = [c for _, c in ms_model.cells_and_names() if isinstance(c, QuantDense)]
    assert len(dense) == 37  # 6 layers x 6 + pooler; the classifier is protected
    assert all(c.weight_q.dtype == ms.uint8 and c.mode == "per_call" for c in dense)
    assert any("37 Linear layers hold their integers" in n for n in ms_model.load_report.notes)
    # held integers: the 37 Linears take 0.5 B + scales per weight instead of 4 B
    at_load = AutoModelForSequenceClassification.from_pretrained(sst2_w4, dequantize="at_load")
    # per_call scales the integer MatMul's output, at_load the weight: the same sum, in another
    # float32 rounding order
    assert maxdiff(_ms_logits(at_load, enc), _ms_logits(ms_model, enc)) <= 1e-5
    held = sum(c.resident_bytes() for c in dense)
    floats = sum(
        c.resident_bytes() for _, c in at_load.cells_and_names() if isinstance(c, QuantDense)
    )
    print(
        f"MiniLM W4 g128 Linears in MindSpore: {held / 2**20:.1f} MiB held vs {floats / 2**20:.1f} MiB float"
    )
    assert held <= 0.15 * floats


def test_quantization_config_quantizes_on_the_way_in(sst2_classifier, tmp_path):
    enc = AutoTokenizer.from_pretrained(sst2_classifier)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    config = QuantizationConfig(bits=8)
    ms_model = AutoModelForSequenceClassification.from_pretrained(
        sst2_classifier, from_pt=True, quantization_config=config
    )
    quant_api.quantize(sst2_classifier, tmp_path / "q", recipe=config, progress=False)
    reference, _ = load_simulated(tmp_path / "q")
    assert maxdiff(_ms_logits(ms_model, enc), _torch_logits(reference, enc)) <= 1e-5
    assert (
        ms_model.quantization_report["quantized_linears"] == 37
    )  # 6 layers x 6 + pooler; classifier kept
    float_model = AutoModelForSequenceClassification.from_pretrained(sst2_classifier)
    assert (
        maxdiff(_ms_logits(ms_model, enc), _ms_logits(float_model, enc)) > 1e-4
    )  # it did quantize


@pytest.fixture(scope="module")
def smollm2_w4(smollm2_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-w4") / "q"
    quant_api.quantize(smollm2_hf, out, progress=False, bits=4, group_size=64, symmetric=False)
    return out


def test_smollm2_w4_runs_in_mindspore_as_in_torch(smollm2_hf, smollm2_w4):
    tok = load_tokenizer(smollm2_hf)  # pads on the left, for batched generation
    ids = tok(["The capital of France is", "Quantization keeps"], padding=True, return_tensors="pt")
    reference, _ = load_simulated(smollm2_w4)
    with torch.no_grad():
        ref = reference(input_ids=ids.input_ids).logits.numpy()
        want = reference.generate(
            **ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        ).numpy()
    model = AutoModelForCausalLM.from_pretrained(smollm2_w4)
    assert sum(isinstance(c, QuantDense) for _, c in model.cells_and_names()) == 30 * 7
    ours = model(ms.Tensor(ids.input_ids.numpy())).logits
    d = maxdiff(ours, ref)
    print(f"\nSmolLM2 W4 g64 asym in MindSpore vs torch: logits max|Δ| {d:.2e}")
    # measured 6.2e-5 to 7.1e-5 (torch 1 or 2 threads, AVX-512 or AVX2 kernels): 2x room
    assert d <= 1.5e-4
    assert (ours.asnumpy().argmax(-1) == ref.argmax(-1)).all()
    # the KV-cache generation loop on integer-held weights: the same greedy tokens as torch
    got = model.generate(
        ids.input_ids.numpy(), attention_mask=ids.attention_mask.numpy(), max_new_tokens=6
    )
    assert (np.asarray(got) == want).all()


def test_generation_on_integer_weights_in_both_modes(tmp_path, mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp32")
    out = tmp_path / "w4"
    quant_api.quantize(tmp_path / "fp32", out, progress=False, bits=4, group_size=32)
    reference, _ = load_simulated(out)
    ids = torch.tensor([[0, 5, 17, 3, 44], [1, 9, 2, 60, 7]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(c, QuantDense) for _, c in model.cells_and_names()) == 2 * 7
    got = model.generate(ids.numpy(), max_new_tokens=10, pad_token_id=0)  # eos 2, as torch
    assert (np.asarray(got) == want.numpy()).all()


def test_a_quantized_folder_converts_to_its_dequantized_float_weights(sst2_w4, tmp_path):
    api.convert(sst2_w4, tmp_path / "float", to="hf", progress=False)
    written = load_file(tmp_path / "float" / "model.safetensors")
    reference, _ = load_simulated(sst2_w4)
    quantized = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 37
    for name, m in quantized.items():
        assert torch.equal(written[f"{name}.weight"], m.weight), name
    assert not any(k.endswith(("weight_packed", "weight_scale")) for k in written)


def test_w8a8_runs_in_mindspore_and_is_refused_as_float_weights(sst2_classifier, tmp_path):
    enc = AutoTokenizer.from_pretrained(sst2_classifier)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    out = tmp_path / "w8a8"
    quant_api.quantize(sst2_classifier, out, progress=False, bits=8, activations="dynamic")
    reference, _ = load_simulated(out)
    ms_model = AutoModelForSequenceClassification.from_pretrained(out)
    d = maxdiff(_ms_logits(ms_model, enc), _torch_logits(reference, enc))
    print(f"\nMiniLM SST-2 W8A8 dynamic in MindSpore vs torch: logits max|Δ| {d:.2e}")
    # per-token int8 inputs: a 1e-7 difference upstream can move an input across a rounding
    # boundary, which shifts that token's output by about one grid step
    assert d <= 2e-2
    assert (_ms_logits(ms_model, enc).argmax(-1) == _torch_logits(reference, enc).argmax(-1)).all()
    with pytest.raises(SlimportError, match="activations are quantized") as e:
        api.convert(out, tmp_path / "float", to="hf", progress=False)
    assert "load_quantized" in e.value.hint
    assert not (tmp_path / "float").exists()


def test_the_seeds_one_liner(sst2_classifier, shared):
    """The seeds' call, as written: 8-bit weights and static int8 inputs calibrated with EMA
    ranges, classifier protected, on SST-2 training text."""
    from slimport.data import read_labeled

    model = AutoModelForSequenceClassification.from_pretrained(
        sst2_classifier,
        from_pt=True,
        quantization_config={
            "quant_mode": "8bit",
            "calib_method": "ema_min_max",
            "protect_layer": ["classifier"],
            "per_channel_quant": True,
            "symmetric": False,
        },
        calib_data=shared / "data/sst2/train.tsv",
    )
    dense = [c for _, c in model.cells_and_names() if isinstance(c, QuantDense)]
    assert len(dense) == 37 and all(c.act == "static" and c.bits == 8 for c in dense)
    assert model.quantization_report["quantized_linears"] == 37
    fp32 = AutoModelForSequenceClassification.from_pretrained(sst2_classifier)
    texts, _ = read_labeled(shared / "data/sst2/dev.tsv")
    tok = AutoTokenizer.from_pretrained(sst2_classifier)
    enc = tok(texts[:64], padding=True, return_tensors="pt")
    agree = (_ms_logits(model, enc).argmax(-1) == _ms_logits(fp32, enc).argmax(-1)).mean()
    print(f"\nseeds' one-liner W8A8 static (ema) in MindSpore: agreement with fp32 {agree:.4f}")
    assert agree >= 0.95  # measured 0.98-0.99 on the full dev set (BENCHMARKS.md)


def test_calibrating_configs_need_calib_data(sst2_classifier):
    with pytest.raises(SlimportError, match="calib_data") as e:
        AutoModelForSequenceClassification.from_pretrained(
            sst2_classifier, quantization_config={"quant_mode": "8bit"}
        )
    assert "calib_data=" in e.value.hint


def test_quantizing_an_already_quantized_model_is_refused(sst2_w4):
    with pytest.raises(SlimportError, match="already quantized"):
        AutoModelForSequenceClassification.from_pretrained(sst2_w4, quantization_config={"bits": 8})


def test_int8_embedding_computes_what_torch_int8_embedding_computes(tmp_path, mode):
    """`embeddings="int8"`: the torch runtime's integers (a scale per row), the tied head on
    them, no float table left; logits and greedy tokens as torch's packed runtime."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimport.runtime.mindspore.quantized import QuantEmbedding
    from slimport.runtime.torch.quantized import load_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp32")
    out = tmp_path / "w8"
    quant_api.quantize(tmp_path / "fp32", out, progress=False, bits=8)
    reference, _ = load_quantized(out, "float32", embeddings="int8")
    model = AutoModelForCausalLM.from_pretrained(out, embeddings="int8")
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and model.head_on_integers
    assert np.array_equal(
        emb.weight_q.asnumpy(), reference.model.embed_tokens.packed.qweight.numpy()
    )
    assert not any(p.dtype == ms.float32 and p.size >= 96 * 64 for p in model.get_parameters())
    ids = torch.tensor([[0, 5, 17, 3, 44], [1, 9, 2, 60, 7]])
    with torch.no_grad():
        ref = reference(input_ids=ids).logits.numpy()
        want = reference.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = model(ms.Tensor(ids.numpy())).logits.asnumpy()
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    got = model.generate(ids.numpy(), max_new_tokens=10, pad_token_id=0)
    assert (np.asarray(got) == want.numpy()).all()
    with pytest.raises(SlimportError, match="embeddings"):
        AutoModelForCausalLM.from_pretrained(out, embeddings="int3")


def test_a_quantized_load_logs_no_unloaded_parameters(tmp_path):
    """The integer parameters are set before the float load; MindSpore must not list them as
    'not loaded' (it printed all 630 names of SmolLM2 W4 on every load). Its logger writes to
    stderr: load in a subprocess with warnings on (GLOG_v=2) and read what it wrote."""
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp32")
    quant_api.quantize(tmp_path / "fp32", tmp_path / "w4", progress=False, bits=4, group_size=32)
    code = (
        "from slimport.runtime.mindspore.auto import AutoModelForCausalLM as A\n"
        f"m = A.from_pretrained({str(tmp_path / 'w4')!r})\n"
        "print(sum(p.dtype == __import__('mindspore').uint8 for p in m.get_parameters()))\n"
    )
    env = {**os.environ, "GLOG_v": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "7"  # the seven Linear layers hold their integers
    assert "not loaded" not in run.stderr and "weight_q" not in run.stderr
