"""compressed-tensors checkpoints: what we save loads in transformers and computes exactly what our
quantized model computes; our own reload gives back the very same integers and scales."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from slimport.compress.pipeline import quantize_  # noqa: E402
from slimport.compress.quant.compressed import (  # noqa: E402
    RECIPE_FILE,
    checkpoint_format,
    consumers,
    linear_tensors,
    load_simulated,
    scheme,
)
from slimport.compress.quant.config import QuantizationConfig  # noqa: E402
from slimport.compress.quant.modules import QuantLinear  # noqa: E402
from slimport.compress.writer import save_quantized  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402

SCHEMES = {
    "w4g64-asym": dict(bits=4, group_size=64, symmetric=False),
    "w4g64-sym": dict(bits=4, group_size=64, symmetric=True),
    "w8-channel": dict(bits=8),
    "w8a8-static": dict(bits=8, activations="static"),
    "w8a8-dynamic": dict(bits=8, activations="dynamic"),
}
TOL = 1e-5


def quantize(model: nn.Module, qc: QuantizationConfig, calib: dict | None = None) -> nn.Module:
    """The pipeline, in memory (static input ranges calibrated on `calib`)."""
    return quantize_(model, qc, None if calib is None else [calib])


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_same_integers(ours: nn.Module, loaded: nn.Module) -> None:
    a = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert a.keys() == b.keys()
    for n, m in a.items():
        for k in (
            "qweight",
            "weight_scale",
            "weight_zero_point",
            "weight",
            "input_scale",
            "input_zero_point",
            "bias",
        ):
            x, y = getattr(m, k), getattr(b[n], k)
            assert (x is None) == (y is None), f"{n}.{k}"
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), f"{n}.{k} differs"
        assert m.weight_args == b[n].weight_args and m.input_args == b[n].input_args


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(vocab: int, shape=(2, 16)) -> dict:
    return {"input_ids": torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))}


def linear_bytes(model, qc) -> tuple[int, int]:
    """fp32 bytes of the quantized Linears' weights and what compressed-tensors stores for them,
    from shapes alone."""
    w, a = qc.weights, qc.inputs
    packed = a is None  # pack-quantized: `bits` per value in int32 words; else one int8 a value
    before = after = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        out, inp = m.out_features, m.in_features
        before += out * inp * 4
        after += out * -(-inp * w.bits // 32) * 4 + 16 if packed else out * inp  # + int64 shape
        rows = 1 if w.granularity == "tensor" else out
        cols = inp // w.group_size if w.granularity == "group" else 1
        after += rows * cols * 4  # fp32 scales
        if not w.symmetric:  # int8 zero points, packed like the weights along the rows
            after += -(-rows * w.bits // 32) * 4 * cols if packed and rows > 1 else rows * cols
        if a is not None and not a.dynamic:
            after += 4 if a.symmetric else 5  # input_scale (+ int8 input_zero_point)
    return before, after


# ---------------------------------------------------------------- random Llama, every scheme


@pytest.fixture(scope="module", params=list(SCHEMES))
def llama_saved(request, tmp_path_factory):
    qc = QuantizationConfig(**SCHEMES[request.param])
    batch = tokens(256)
    model = quantize(tiny_llama(), qc, calib=batch)
    folder = tmp_path_factory.mktemp(request.param) / "q"
    info = save_quantized(model, folder, qc)
    return request.param, qc, model, folder, info, batch


def test_transformers_loads_our_checkpoint_with_equal_logits(llama_saved):
    from transformers import AutoModelForCausalLM

    name, qc, model, folder, _, batch = llama_saved
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_diff(logits(hf, batch), logits(model, batch)) <= TOL
    # after its first forward transformers holds the dequantized weights: exactly ours
    ours = dict(model.named_modules())
    for n, m in hf.named_modules():
        if isinstance(ours.get(n), QuantLinear):
            assert torch.equal(m.weight, ours[n].weight), n
    # the protected head stays a float Linear, named in `ignore`
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert block["ignore"] == ["lm_head"]
    assert not hasattr(hf.lm_head, "quantization_scheme")
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    assert block["format"] == ("int-quantized" if qc.activations else "pack-quantized")


@pytest.mark.parametrize("symmetric", [True, False])
def test_what_plain_transformers_does_with_a_w4_folder(symmetric, tmp_path):
    """What `slimport quantize` tells users (quant.compressed.consumers): transformers loads a
    symmetric W4 folder packed and decompresses it on its first forward; the packed zero points
    of an asymmetric one break its compressed load path, hence `"dequantize": true` (dense at
    load). If the asymmetric load ever succeeds, transformers fixed it: drop the key."""
    from transformers import AutoModelForCausalLM

    qc = QuantizationConfig(bits=4, group_size=64, symmetric=symmetric)
    save_quantized(quantize(tiny_llama(), qc), tmp_path / "q", qc)
    config = json.loads((tmp_path / "q/config.json").read_text())
    assert config["quantization_config"].get("dequantize", False) is not symmetric
    assert any(("dense float at load" in c) is not symmetric for c in consumers(qc))
    config["quantization_config"].pop("dequantize", None)
    (tmp_path / "q/config.json").write_text(json.dumps(config))
    if not symmetric:
        with pytest.raises(RuntimeError, match="mismatch"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        return
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    proj = hf.model.layers[0].mlp.up_proj
    assert proj.weight_packed.dtype == torch.int32 and "weight" not in dict(proj.named_parameters())
    logits(hf, tokens(256))
    assert proj.weight.dtype == torch.float32  # decompressed, the whole model, for good


def test_load_simulated_gives_back_the_same_integers(llama_saved):
    name, qc, model, folder, _, batch = llama_saved
    loaded, qc2 = load_simulated(folder)
    assert qc2 == qc and not loaded.training
    assert_same_integers(model, loaded)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_checkpoint_sizes_follow_from_shapes(llama_saved):
    name, qc, model, folder, info, _ = llama_saved
    before, after = linear_bytes(model, qc)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = model.state_dict()
    floats = sum(t.numel() * 4 for k, t in state.items() if k.rpartition(".")[0] not in quantized)
    assert info["bytes_before"] == floats + before
    assert info["bytes_after"] == floats + after
    header = (folder / "model.safetensors").stat().st_size - info["bytes_after"]
    assert 0 < header < 64 * 1024
    ratio = after / before
    if qc.bits == 8:  # one byte a weight + a 4-byte scale per row of 128 (or 256)
        assert 1 / 4 < ratio < 1 / 4 + 4 / 128 + 0.01
    else:  # half a byte a weight + a scale (and packed zero point) per 64
        assert 1 / 7.2 < ratio < 1 / 6.9


def test_linear_tensors_are_what_the_library_compressor_writes(llama_saved):
    from compressed_tensors.compressors import BaseCompressor

    name, qc, model, *_ = llama_saved
    s = scheme(qc)
    compressor = BaseCompressor.get_value_from_registry(checkpoint_format(qc))
    m = model.model.layers[1].mlp.down_proj
    state = {
        "weight": m.weight,
        "weight_scale": m.weight_scale,
        "weight_zero_point": m.weight_zero_point,
    }
    if m.input_scale is not None:
        state |= {"input_scale": m.input_scale, "input_zero_point": m.input_zero_point}
    want = compressor.compress(state, s)
    got = {
        k.removeprefix("down.").split(".")[-1]: v for k, v in linear_tensors("down", m, qc).items()
    }
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# ---------------------------------------------------------------- the real models


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n == "w8a8-dynamic" else pytest.mark.slow) for n in SCHEMES],
)
def test_smollm2(smollm2_hf, tmp_path, name):
    """SmolLM2-135M (tied embeddings, GQA): logits and a greedy decode equal in transformers."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    qc = QuantizationConfig(**SCHEMES[name])
    batch = tokens(49152, (1, 24))
    model = quantize(LlamaForCausalLM.from_pretrained(smollm2_hf).eval(), qc, calib=batch)
    info = save_quantized(model, tmp_path / "q", qc, tokenizer_dir=smollm2_hf)
    assert "tokenizer.json" in info["files"] and (tmp_path / "q/tokenizer.json").is_file()
    before, after = linear_bytes(model, qc)
    assert after / before == pytest.approx(1 / 7 if qc.bits == 4 else 1 / 4, rel=0.03)
    want = logits(model, batch)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert max_diff(logits(hf, batch), want) <= TOL
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tie kept: the head was protected

    loaded, _ = load_simulated(tmp_path / "q")
    assert_same_integers(model, loaded)
    assert torch.equal(logits(loaded, batch), want)
    prompt = batch["input_ids"][:, :8]
    greedy = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(hf.generate(prompt, **greedy), loaded.generate(prompt, **greedy))


@pytest.mark.parametrize("name", ["w8a8-static", "w8a8-dynamic", "w4g64-sym"])
def test_minilm_classifier(minilm_dir, tmp_path, name):
    """BertForSequenceClassification on MiniLM (random head): biases, pooler, float classifier."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    sentences = ["a short one", "and a somewhat longer sentence, to pad the batch"]
    batch = dict(tok(sentences, return_tensors="pt", padding=True))
    torch.manual_seed(0)
    qc = QuantizationConfig(**SCHEMES[name])
    model = quantize(
        BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3).eval(), qc, batch
    )
    save_quantized(model, tmp_path / "q", qc, tokenizer_dir=minilm_dir)
    config = json.loads((tmp_path / "q/config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["quantization_config"]["ignore"] == ["classifier"]

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    loaded, _ = load_simulated(tmp_path / "q")
    assert_same_integers(model, loaded)
    # one sentence at a time: for a 2-D input (the pooler's [batch, hidden]) compressed-tensors'
    # dynamic "token" scales span the whole batch, where ours (and vLLM's) are per row
    for i in range(len(sentences)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        want = logits(model, one)
        assert max_diff(logits(hf, one), want) <= TOL
        assert torch.equal(logits(loaded, one), want)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


# ---------------------------------------------------------------- other layouts


def test_quantized_tied_head_is_saved_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    qc = QuantizationConfig(bits=8, protect=[])
    batch = tokens(256)
    model = quantize(tiny_llama(tie=True), qc)
    save_quantized(model, tmp_path / "q", qc)
    config = json.loads((tmp_path / "q/config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert max_diff(logits(hf, batch), logits(model, batch)) <= TOL
    loaded, _ = load_simulated(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_three_bit_weights_pack_densely(tmp_path):
    """3-bit integers straddle int32 words in compressed-tensors' dense packing (32 values in
    3 words); transformers unpacks them to the same weights."""
    from transformers import AutoModelForCausalLM

    qc = QuantizationConfig(bits=3, group_size=32, method="gptq")
    batch = tokens(256)
    model = quantize(tiny_llama(), qc, calib=batch)
    save_quantized(model, tmp_path / "q", qc)
    up = linear_tensors("up", model.model.layers[0].mlp.up_proj, qc)
    assert up["up.weight_packed"].shape == (256, 128 * 3 // 32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert max_diff(logits(hf, batch), logits(model, batch)) <= TOL
    loaded, _ = load_simulated(tmp_path / "q")
    assert_same_integers(model, loaded)


def test_config_json_alone_is_enough_to_reload(tmp_path):
    """A checkpoint without our recipe file (e.g. from llm-compressor) reloads from config.json."""
    qc = QuantizationConfig(bits=4, group_size=64, symmetric=False)
    model = quantize(tiny_llama(), qc)
    save_quantized(model, tmp_path / "q", qc)
    (tmp_path / "q" / RECIPE_FILE).unlink()
    loaded, derived = load_simulated(tmp_path / "q")
    assert derived.weights == qc.weights and derived.inputs is None
    assert derived.is_protected("lm_head") and not derived.is_protected(
        "model.layers.0.mlp.up_proj"
    )
    assert_same_integers(model, loaded)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def w4_folder(tmp_path_factory):
    qc = QuantizationConfig(bits=4, group_size=64, symmetric=True)
    folder = tmp_path_factory.mktemp("w4") / "q"
    save_quantized(quantize(tiny_llama(), qc), folder, qc)
    return folder


def copy_of(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_folder_without_quantization_config(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(SlimportError, match="not a compressed-tensors model"):
        load_simulated(tmp_path / "plain")
    with pytest.raises(SlimportError, match="not found"):
        load_simulated(tmp_path / "nowhere")


def test_missing_packed_tensor_is_named(w4_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(w4_folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight_packed"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        SlimportError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight_packed.*missing"
    ):
        load_simulated(folder)


def test_unsupported_scheme_is_refused(w4_folder, tmp_path):
    folder = copy_of(w4_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights.update(type="float", num_bits=8, strategy="channel", group_size=None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimportError, match="weight scheme .* not supported"):
        load_simulated(folder)


def test_recipe_that_disagrees_with_config(w4_folder, tmp_path):
    folder = copy_of(w4_folder, tmp_path)
    (folder / RECIPE_FILE).write_text(json.dumps(QuantizationConfig(bits=8).to_dict()))
    with pytest.raises(SlimportError, match="disagrees"):
        load_simulated(folder)


def test_saving_what_cannot_be_saved(tmp_path):
    qc = QuantizationConfig(bits=8, activations="static")
    with pytest.raises(SlimportError, match="no quantized Linear"):
        save_quantized(tiny_llama(), tmp_path / "a", qc)
    uncalibrated = quantize(tiny_llama(), QuantizationConfig(bits=8, activations="dynamic"))
    for m in uncalibrated.modules():  # as if a static recipe had skipped calibration
        if isinstance(m, QuantLinear):
            m.input_args = qc.inputs
    with pytest.raises(SlimportError, match="no input scale"):
        save_quantized(uncalibrated, tmp_path / "b", qc)
    with pytest.raises(SlimportError, match="one scheme"):
        save_quantized(
            quantize(tiny_llama(), QuantizationConfig(bits=4, group_size=64)),
            tmp_path / "c",
            QuantizationConfig(bits=8),
        )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # nothing half-written
