"""Quantized GGUF: our integers in Q8_0 / Q4_0 / Q4_1 blocks, read back by transformers' GGUF
loader, and float weights quantized by gguf-py's reference quantizer as llama.cpp does.

CI runs on a two-block slice of the real SmolLM2 (its own weights, no tokenizer: the vocabulary
is what makes transformers' GGUF loading slow); the whole model is the slow variant."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimport import api, cli
from slimport.compress import pipeline
from slimport.compress.quant import primitives as P
from slimport.compress.quant.compressed import load_simulated
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.compress.quant.gptq import gptq
from slimport.compress.quant.observers import mse_weight_qparams
from slimport.errors import SlimportError
from slimport.io import gguf as gguf_io
from slimport.io.auto import open_checkpoint
from slimport.io.compressed import dequantize

Q = gguf.GGMLQuantizationType
IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def quantized(src: Path, out: Path, calibrate: bool = False, **recipe) -> Path:
    """A compressed-tensors folder of `src` (recipe = QuantizationConfig fields)."""
    if not out.exists():
        calibration = [{"input_ids": IDS}] if calibrate else None
        pipeline.quantize(src, out, QuantizationConfig(**recipe), calibration, progress=False)
    return out


def transformers_logits(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf").eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    model, _ = load_simulated(folder)  # QuantLinear: the integers' dequantized value
    with torch.no_grad():
        return model(ids).logits


def assert_weights_are_our_integers(folder: Path, gguf_folder: Path, tmp: Path) -> None:
    """GGUF -> HF gives every quantized Linear's weight exactly (q - z) * s, bit for bit."""
    api.convert(gguf_folder, tmp / "back", to="hf", progress=False)
    back = load_file(tmp / "back" / "model.safetensors")
    with open_checkpoint(folder) as ckpt:
        assert len(ckpt.quantized) == 14
        for name, lin in ckpt.quantized.items():
            assert torch.equal(back[f"{name}.weight"], dequantize(*lin.read())), name


CASES = {  # GGUF type: the recipe whose scheme it holds exactly
    "q4_0": dict(bits=4, group_size=32, symmetric=True),
    "q4_1": dict(bits=4, group_size=32, symmetric=False),
    "q8_0": dict(bits=8, group_size=32, symmetric=True),
}


@pytest.mark.parametrize("gguf_type", list(CASES))
def test_our_integers_are_written_exactly_and_transformers_computes_our_model(
    gguf_type, smollm2_slice, tmp_path
):
    folder = quantized(smollm2_slice, tmp_path / "q", gguf_compatible=True, **CASES[gguf_type])
    report = api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)  # default type
    with gguf_io.read(tmp_path / "gguf" / "model.gguf") as ckpt:
        # 14 Linears as their scheme's type; the float embedding and norms as they were (F32)
        assert ckpt.metadata["gguf_types"] == {gguf_type.upper(): 14, "F32": 6}
        assert ckpt.metadata["general.file_type"] == int(
            gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]
        )
    assert any(f"written from their W{CASES[gguf_type]['bits']} g32" in n for n in report["notes"])
    assert_weights_are_our_integers(folder, tmp_path / "gguf", tmp_path)
    delta = (transformers_logits(tmp_path / "gguf") - our_logits(folder)).abs().max().item()
    print(
        f"\n{gguf_type}: transformers' GGUF load vs our dequantized model, logits max|d| {delta:.3g}"
    )
    assert delta <= 1e-5


def _fp16(x: torch.Tensor) -> bool:
    return torch.equal(x.half().to(x.dtype), x)


@pytest.mark.parametrize("bits, symmetric", [(4, False), (3, False), (4, True), (8, True)])
def test_fp16_qparams_give_float16_scales_and_minimums_close_to_the_plain_ones(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    mag = torch.logspace(-1.5, 1, 4000, dtype=torch.float64)  # scales in float16's normal range
    lo = -(0.5 + torch.rand(4000, generator=g, dtype=torch.float64)) * mag
    hi = (0.5 + torch.rand(4000, generator=g, dtype=torch.float64)) * mag
    s0, _ = P.qparams(lo, hi, bits, symmetric)
    s, z = P.qparams(lo, hi, bits, symmetric, fp16=True)
    qmin, qmax = P.qrange(bits)
    assert _fp16(s) and _fp16((qmin - z) * s) and ((z >= qmin) & (z <= qmax)).all()
    # nearest float16 (2^-11 relative), or 7 significant bits where the minimum needs it (2^-7)
    assert ((s - s0).abs() / s0).max() <= 2**-7
    if not symmetric:  # most scales need no shortening
        assert ((s - s0).abs() / s0 <= 2**-11).float().mean() > 0.2


@pytest.mark.parametrize("act_order", [True, False])  # static groups / groups from updated columns
def test_gptq_and_the_mse_observer_pick_float16_scales(act_order):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 128, generator=g), torch.randn(256, 128, generator=g)
    args = QuantArgs(4, False, "group", 32, fp16_scales=True)
    r = gptq(w, x.T @ x, args, act_order=act_order)
    assert _fp16(r.scale) and _fp16((-8 - r.zero) * r.scale)
    s, z = mse_weight_qparams(w, args)
    assert _fp16(s) and _fp16((-8 - z) * s)


def test_without_the_option_inexact_scales_are_an_error_unless_requantizing(
    smollm2_slice, tmp_path
):
    folder = quantized(smollm2_slice, tmp_path / "q", bits=4, group_size=32, symmetric=False)
    out = tmp_path / "gguf"
    with pytest.raises(
        SlimportError, match=r"block (scales|minimums).* are not float16 values .*Q4_1 cannot hold"
    ):
        api.convert(folder, out, to="gguf", progress=False)
    assert not out.exists()
    report = api.convert(folder, out, to="gguf", options={"gguf_requantize": True}, progress=False)
    assert any("requantized by gguf-py" in n for n in report["notes"])
    with gguf_io.read(out / "model.gguf") as ckpt:
        assert ckpt.metadata["gguf_types"] == {"Q4_1": 14, "F32": 6}
    # requantized from the dequantized weights: close to our model, not equal
    delta = (transformers_logits(out) - our_logits(folder)).abs().max().item()
    assert 0 < delta < 2.0


def _float_file(src: Path, tmp: Path, gguf_type: str) -> gguf.GGUFReader:
    api.convert(src, tmp / gguf_type, to="gguf", options={"gguf_type": gguf_type}, progress=False)
    return gguf.GGUFReader(tmp / gguf_type / "model.gguf")


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_1"])
def test_float_weights_are_quantized_by_gguf_py_as_llama_cpp_does(
    gguf_type, smollm2_slice, tmp_path
):
    exact = {t.name: np.array(t.data) for t in _float_file(smollm2_slice, tmp_path, "f32").tensors}
    ours = {t.name: t for t in _float_file(smollm2_slice, tmp_path, gguf_type).tensors}
    assert ours.keys() == exact.keys()
    for name, t in ours.items():
        x = exact[name]  # the GGUF layout (RoPE rows permuted) in float32
        if x.ndim == 1:  # norms stay F32
            assert t.tensor_type == Q.F32 and np.array_equal(np.array(t.data), x), name
            continue
        # the tied embedding is the output head: Q8_0, as llama-quantize picks for 576-wide rows
        want = Q.Q8_0 if name == "token_embd.weight" else Q[gguf_type.upper()]
        assert t.tensor_type == want, name
        assert np.array_equal(np.array(t.data), gguf.quants.quantize(x, want)), name  # bit for bit


def test_rows_of_no_whole_block_fall_back_to_f16(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80,
                                   num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=False)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    reader = _float_file(tmp_path / "hf", tmp_path, "q4_0")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16  # 80 columns: not whole 32-value blocks
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == Q.Q4_0
    assert types["output.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q4_0


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, options, message",
    [
        (dict(bits=4, group_size=16, symmetric=True), {},
         "scheme W4 g16 sym (576 input features) cannot be written as a quantized GGUF type"),
        (dict(bits=8, symmetric=False), {},
         "scheme W8 per-channel asym (576 input features) cannot be written as a quantized GGUF type"),
        (dict(bits=4, group_size=32, symmetric=False, gguf_compatible=True), {"gguf_type": "q4_0"},
         "cannot be written as --gguf-type q4_0 without re-rounding; it holds exactly: q4_1, q8_0"),
        (dict(bits=8, activations="dynamic"), {}, "its activations are quantized too"),
    ],
)  # fmt: skip
def test_a_scheme_gguf_cannot_hold_is_one_clear_error_and_no_output(
    recipe, options, message, smollm2_slice, tmp_path, capsys
):
    folder = quantized(smollm2_slice, tmp_path / "q", **recipe)
    out = tmp_path / "gguf"
    with pytest.raises(SlimportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.convert(folder, out, to="gguf", options=options, progress=False)
    argv = ["convert", str(folder), str(out), "--to", "gguf"]
    argv += ["--gguf-type", options["gguf_type"]] if options else []
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("slimport: error: ") and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".gguf*"))


@pytest.mark.parametrize(
    "recipe, message",
    [
        (dict(bits=4, group_size=64, symmetric=False, activations="dynamic"), "W4 g64 asym with quantized activations"),
        (dict(bits=4, group_size=48), "W4 g48 asym"),
        (dict(bits=8, symmetric=False), "W8 per-channel asym"),
    ],
)  # fmt: skip
def test_gguf_compatible_refuses_a_scheme_no_gguf_type_holds(recipe, message):
    with pytest.raises(SlimportError, match=f"gguf_compatible: no GGUF block type holds {message}"):
        QuantizationConfig(gguf_compatible=True, **recipe)


# --- slow: the calibrating methods end to end, the whole SmolLM2 -----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq+gptq", "awq"])
def test_gguf_compatible_gptq_and_awq_write_losslessly(method, smollm2_slice, tmp_path):
    """Asymmetric W4 g32 from the calibrating methods: every scale and every Q4_1 minimum
    -(z - qmin) * s is a float16 value, so the default write (Q4_1) is lossless."""
    folder = quantized(smollm2_slice, tmp_path / "q", calibrate=True, method=method, bits=4,
                       group_size=32, symmetric=False, gguf_compatible=True)  # fmt: skip
    with open_checkpoint(folder) as ckpt:
        for name, lin in ckpt.quantized.items():
            q, s, z = lin.read()
            for what, x in (("scale", s), ("minimum", (-8 - z.float()) * s)):
                assert torch.equal(x.half().float(), x), f"{name}: {what} is no float16 value"
    api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)
    assert_weights_are_our_integers(folder, tmp_path / "gguf", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(CASES))
def test_smollm2_quantized_gguf_in_transformers(gguf_type, smollm2_hf, tmp_path):
    folder = quantized(smollm2_hf, tmp_path / "q", gguf_compatible=True, **CASES[gguf_type])
    api.convert(folder, tmp_path / "gguf", to="gguf", progress=False)
    with gguf_io.read(tmp_path / "gguf" / "model.gguf") as ckpt:
        assert ckpt.metadata["gguf_types"] == {gguf_type.upper(): 210, "F32": 62}
        assert ckpt.metadata["tokenizer.ggml.model"] == "gpt2"  # the tokenizer travels too
    delta = (transformers_logits(tmp_path / "gguf") - our_logits(folder)).abs().max().item()
    print(f"\nSmolLM2 {gguf_type}: transformers' GGUF load vs our model, logits max|d| {delta:.3g}")
    assert delta <= 1e-5
