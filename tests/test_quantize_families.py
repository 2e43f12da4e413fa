"""GPT-2 and DistilBERT through the block-by-block pipeline: supported by their CompressLayout rows
in arch/layout.py alone. Random small transformers configs, saved with save_pretrained; every
algorithm; the folder reloads with the integers we computed, and transformers computes our logits.

GPT-2 stores its projections as Conv1D ([in, out] weights; `c_attn` = q|k|v in one layer). They
are quantized as the nn.Linear they compute, so the checkpoint holds compressed-tensors' Linear
layout. Stock transformers cannot build that (compressed-tensors quantizes only nn.Linear
modules, and its dequantize path yields [out, in] for a [in, out] parameter), so for GPT-2 the
files are decoded by compressed-tensors' own compressor into a stock GPT2LMHeadModel.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from slimport.compress import pipeline  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.compress.quant.config import QuantizationConfig  # noqa: E402
from slimport.compress.quant.modules import QuantLinear  # noqa: E402

TOL = 1e-5
RECIPES = {
    "rtn": dict(bits=4, group_size=32),
    "gptq": dict(bits=4, group_size=32, method="gptq"),
    "awq": dict(bits=4, group_size=32, method="awq"),
    "smoothquant": dict(bits=8, smoothquant=0.5),
}


def batches(vocab: int, mask: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        b = {"input_ids": torch.randint(0, vocab, (2, 16), generator=g)}
        if mask:  # the second sentence is padded: padding is not calibration data
            b["attention_mask"] = torch.tensor([[1] * 16, [1] * 11 + [0] * 5])
        out.append(b)
    return out


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    folder = tmp_path_factory.mktemp("gpt2") / "fp32"
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder, batches(128, mask=False)


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("distilbert") / "fp32"
    DistilBertForSequenceClassification(cfg).eval().save_pretrained(folder)
    return folder, batches(128, mask=True)


def run(src, tmp_path, name: str, calibration, **extra) -> tuple[dict, QuantizationConfig]:
    config = QuantizationConfig(**RECIPES[name], **extra)
    report = pipeline.quantize(src, tmp_path / name, config, calibration, progress=False)
    return report, config


def decoded_by_the_library(folder, model) -> None:
    """Load `folder` into the float `model` with compressed-tensors' own decompressor, each
    quantized Linear transposed into the Conv1D it came from."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (scheme,) = CTConfig.model_validate(qc).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors |= load_file(f)
    state = {}
    quantized = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    for name in quantized:
        parts = {
            k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")
        }
        bias = parts.pop("bias", None)
        w = compressor.decompress(parts, scheme)["weight"]
        conv1d = type(model.get_submodule(name)).__name__ == "Conv1D"
        state[name + ".weight"] = w.T if conv1d else w
        if bias is not None:
            state[name + ".bias"] = bias
    state |= {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in quantized}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()


@pytest.mark.parametrize("name", list(RECIPES))
def test_gpt2(gpt2, tmp_path, name):
    from transformers import GPT2LMHeadModel

    src, calibration = gpt2
    report, config = run(src, tmp_path, name, calibration)
    out = tmp_path / name
    # every Conv1D of both blocks quantized; the tied lm_head kept float (stored once)
    assert report["quantized_linears"] == 2 * 4 and report["protected_linears"] == ["lm_head"]
    if name in ("awq", "smoothquant"):  # the layout's ln_1 -> c_attn, ln_2 -> c_fc pairs
        scaled = {r["module"]: r.get("scaled_by") for r in report["modules"]}
        assert scaled["transformer.h.1.attn.c_attn"] == "ln_1"
        assert scaled["transformer.h.1.mlp.c_fc"] == "ln_2"
    ours, qc = load_simulated(out)
    assert qc == config
    assert isinstance(ours.transformer.h[0].attn.c_attn, QuantLinear)
    assert ours.transformer.h[0].attn.c_attn.weight.shape == (3 * 64, 64)  # [out, in]
    batch = calibration[0]
    want = logits(ours, batch)

    # the in-memory pipeline computes the same integers from the same calibration
    mem = pipeline.quantize_(GPT2LMHeadModel.from_pretrained(src), config, calibration)
    assert torch.equal(logits(mem, batch), want)

    # compressed-tensors' decoder + transformers' own GPT-2 (Conv1D) compute our logits
    hf = GPT2LMHeadModel.from_pretrained(src).eval()
    fp32 = logits(hf, batch)
    decoded_by_the_library(out, hf)
    assert (logits(hf, batch) - want).abs().max() <= TOL
    # and the quantized model still is the model (a transposed weight would not be)
    assert (want - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize("name", list(RECIPES))
def test_distilbert(distilbert, tmp_path, name):
    from transformers import AutoModelForSequenceClassification

    src, calibration = distilbert
    extra = {"activations": "static"} if name == "smoothquant" else {}
    report, _ = run(src, tmp_path, name, calibration, **extra)
    out = tmp_path / name
    # 6 Linears a block + the pre-classifier; the classifier head stays float
    assert report["quantized_linears"] == 2 * 6 + 1 and report["protected_linears"] == [
        "classifier"
    ]
    if name in ("awq", "smoothquant"):
        scaled = {r["module"]: r.get("scaled_by") for r in report["modules"]}
        assert scaled["distilbert.transformer.layer.0.attention.out_lin"] == "attention.v_lin"
    ours, _ = load_simulated(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    for batch in calibration:
        want = logits(ours, batch)
        assert (logits(hf, batch) - want).abs().max() <= TOL


def test_gpt2_conv1d_left_float_keeps_its_layout(gpt2, tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    src, calibration = gpt2
    protect = [r"lm_head$", r"attn\.c_proj$"]
    report, config = run(src, tmp_path, "rtn", None, protect=protect)
    assert report["protected_linears"] == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_proj",
        "lm_head",
    ]
    tensors = {}
    for f in (tmp_path / "rtn").glob("*.safetensors"):
        tensors |= load_file(f)
    assert tensors["transformer.h.0.attn.c_proj.weight"].shape == (64, 64)
    fp32 = GPT2LMHeadModel.from_pretrained(src).state_dict()
    fc = tensors["transformer.h.0.mlp.c_fc.weight_shape"].tolist()
    assert fc == [4 * 64, 64] and fp32["transformer.h.0.mlp.c_fc.weight"].shape == (64, 4 * 64)
    for i in range(2):  # the float Conv1D weights exactly as the checkpoint held them, [in, out]
        name = f"transformer.h.{i}.attn.c_proj.weight"
        assert torch.equal(tensors[name], fp32[name])
    ours, _ = load_simulated(tmp_path / "rtn")
    assert type(ours.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    mem = pipeline.quantize_(GPT2LMHeadModel.from_pretrained(src), config)
    # Conv1D's addmm and Linear's matmul may round differently: equal within fp32 rounding
    assert (logits(ours, calibration[0]) - logits(mem, calibration[0])).abs().max() <= TOL


def test_gpt2_quantized_folder_reads_through_the_hub_loader_as_its_conv1d_model(gpt2, tmp_path):
    """The hub loader reads each quantized Linear back into the [in, out] layout of the Conv1D
    it came from (the square attn.c_proj too, whose shape alone would not tell), so converting
    the folder gives a stock GPT-2 that computes the simulated quantized model."""
    from transformers import GPT2LMHeadModel

    from slimport import api

    src, calibration = gpt2
    run(src, tmp_path, "gptq", calibration)
    model = api.load(tmp_path / "gptq")
    hub = model.hub["transformer.h.0.attn.c_attn.weight"]
    assert hub.shape == (64, 3 * 64) and hub.quantized is not None and hub.in_out
    model.source.close()
    api.convert(tmp_path / "gptq", tmp_path / "hf", to="hf", progress=False)
    ours, _ = load_simulated(tmp_path / "gptq")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    for batch in calibration:
        assert (logits(hf, batch) - logits(ours, batch)).abs().max() <= TOL


def test_gpt2_quantized_folder_exports_its_integers_to_gguf_and_onnx(gpt2, tmp_path):
    """Transposed back, the Conv1D weights are the checkpoint's integers as they are: Q4_1
    blocks and MatMulNBits hold them exactly."""
    from transformers import GPT2LMHeadModel

    from slimport import api

    src, calibration = gpt2
    run(src, tmp_path, "rtn", calibration, gguf_compatible=True)
    folder = tmp_path / "rtn"
    ours, _ = load_simulated(folder)
    report = api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)
    assert (
        "8 quantized Linear weight(s) written from their W4 g32 asym integers as 8 Q4_1"
        in (report["notes"])
    )
    api.convert(tmp_path / "gguf", tmp_path / "back", to="hf", progress=False)
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert (logits(back, calibration[0]) - logits(ours, calibration[0])).abs().max() <= TOL

    pytest.importorskip("onnxruntime")
    from slimport.runtime.onnx.export import export_onnx
    from slimport.runtime.onnx.session import OnnxModel

    export_onnx(folder, tmp_path / "onnx", accuracy_level=0)
    ids = calibration[0]["input_ids"]
    onnx_logits = OnnxModel(tmp_path / "onnx").logits(ids.numpy())
    assert abs(onnx_logits - logits(ours, calibration[0]).numpy()).max() <= 1e-4
