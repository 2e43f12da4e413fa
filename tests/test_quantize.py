"""`slimport quantize` on the real SmolLM2-135M: what each recipe costs in WikiText-2 perplexity.

CI measures a fixed subset (the first 4 non-overlapping 512-token windows of the raw test split;
calibration: 8 x 512 tokens of the validation split, seed 0). benchmarks/quant_accuracy.py runs
the same recipes on the full test set.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from slimport.compress import api
from slimport.compress.quant.compressed import load_simulated
from slimport.errors import SlimportError
from slimport.evaluate.perplexity import perplexity

WINDOWS, SEQ_LEN, CALIB = 4, 512, 8


@pytest.fixture(scope="module")
def wiki(shared, smollm2_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimport.data import wikitext_windows

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    windows = wikitext_windows(tok, shared / "data/wikitext-2-raw/wiki.test.raw", SEQ_LEN, WINDOWS)
    fp32 = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    return windows, perplexity(fp32, windows, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def quantized(smollm2_hf, shared, wiki, tmp_path_factory):
    """Quantize once per recipe, evaluate once: {name: (perplexity, report)}."""
    windows, _ = wiki
    cache: dict[str, tuple[float, dict]] = {}

    def run(name: str, **options) -> tuple[float, dict]:
        if name not in cache:
            out = tmp_path_factory.mktemp("q") / name
            report = api.quantize(
                smollm2_hf, out, progress=False, num_samples=CALIB, seq_len=SEQ_LEN,
                calib_data=str(shared / "data/wikitext-2/valid.txt"), **options,
            )  # fmt: skip
            model, _ = load_simulated(out)
            cache[name] = (perplexity(model, windows, progress=False)["perplexity"], report)
        return cache[name]

    return run


def test_w8_weight_only_is_within_half_a_percent_of_fp32(quantized, wiki):
    ppl, report = quantized("w8", bits=8)
    fp32 = wiki[1]
    assert ppl <= fp32 * 1.005, (ppl, fp32)
    # 8-bit integers for every block Linear; embeddings (tied to lm_head) stay fp32
    assert report["bytes_after"] < 0.5 * report["bytes_before"]


def test_w4_gptq_and_awq_are_clearly_better_than_rtn(quantized, wiki):
    rtn, rep = quantized("w4-rtn", bits=4, group_size=64, symmetric=False)
    gptq, _ = quantized("w4-gptq", bits=4, group_size=64, symmetric=False, method="gptq")
    awq, _ = quantized("w4-awq", bits=4, group_size=64, symmetric=False, method="awq")
    fp32 = wiki[1]
    print(f"fp32 {fp32:.3f}  W4 g64 RTN {rtn:.3f}  GPTQ {gptq:.3f}  AWQ {awq:.3f}")
    # "clearly": each recovers at least a quarter of what RTN lost
    assert gptq < rtn - 0.25 * (rtn - fp32)
    assert awq < rtn - 0.25 * (rtn - fp32)
    assert rep["protected_linears"] == ["lm_head"]


def test_w8a8_smoothquant_beats_plain_w8a8(quantized, wiki):
    plain, _ = quantized("w8a8", bits=8, activations="static")
    smooth, _ = quantized("w8a8-sq", bits=8, activations="static", smoothquant=0.5)
    print(f"fp32 {wiki[1]:.3f}  W8A8 {plain:.3f}  W8A8+SmoothQuant {smooth:.3f}")
    assert smooth < plain


def test_report_lists_every_quantized_module_with_its_error(quantized):
    _, report = quantized("w4-gptq", bits=4, group_size=64, symmetric=False, method="gptq")
    rows = report["modules"]
    assert len(rows) == report["quantized_linears"] == 30 * 7
    assert all(0 < r["weight_rel_err"] < 0.5 and r["output_err"] >= 0 for r in rows)


def test_recipe_yaml_and_seed_dict_form(tmp_path):
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(
        "quantization:\n  bits: 4\n  method: gptq\n  group_size: 64\n  symmetric: false\n"
    )
    c = api.make_config(recipe, num_samples=32)
    assert (c.bits, c.method, c.granularity, c.group_size, c.num_samples) == (
        4,
        "gptq",
        "group",
        64,
        32,
    )
    seed = api.make_config(
        {"quant_mode": "8bit", "calib_method": "ema_min_max", "protect_layer": ["classifier"],
         "per_channel_quant": True, "symmetric": True}
    )  # fmt: skip
    assert (seed.bits, seed.activations, seed.observer, seed.granularity) == (
        8,
        "static",
        "ema_min_max",
        "channel",
    )
    assert seed.is_protected("classifier") and not seed.is_protected("bert.pooler.dense")
    nothing = api.make_config({"protect": [""]})  # `--protect ''`: no module kept in float
    assert not nothing.is_protected("lm_head") and not nothing.is_protected("model.layers.0.mlp")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 3, "method": "rtn"}, "3-bit weights need method gptq"),
        ({"bits": 5}, "bits: 5 is not supported"),
        ({"method": "awq", "smoothquant": 0.5}, "use one of the two"),
        ({"bits": 16, "activations": "static"}, "16-bit is a plain cast"),
        ({"bits": 4, "granularity": "group"}, "needs a positive group_size"),
        ({"observer": "magic"}, "unknown 'magic'"),
        ({"smoothquant": 1.5}, "outside [0, 1]"),
        ({"nonsense": 1}, "unknown quantization option(s): nonsense"),
    ],
)
def test_impossible_options_are_refused_up_front(options, message):
    with pytest.raises(SlimportError, match=re.escape(message)):
        api.make_config(**options)


def test_bad_calibration_and_protect_input(smollm2_hf, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SlimportError, match="no calib_data was given"):
        api.quantize(smollm2_hf, out, method="gptq", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SlimportError, match="empty"):
        api.quantize(smollm2_hf, out, method="gptq", calib_data=str(empty), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(SlimportError, match="too short"):
        api.quantize(smollm2_hf, out, method="gptq", calib_data=str(short), progress=False)
    with pytest.raises(SlimportError, match="matches no Linear layer"):
        api.quantize(smollm2_hf, out, protect=["lm_head", "no_such_layer"], progress=False)
    with pytest.raises(SlimportError, match="every Linear layer is protected"):
        api.quantize(smollm2_hf, out, protect=[".*"], progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_nan_weights_are_refused_naming_the_tensor(smollm2_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in smollm2_hf.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(smollm2_hf / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(SlimportError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*NaN"):
        api.quantize(bad, tmp_path / "out", bits=4, group_size=64, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_family_without_a_compression_layout_is_refused():
    from slimport.arch.layout import layout_for

    with pytest.raises(SlimportError, match=r"'t5' models is not supported.*") as e:
        layout_for("t5")
    assert "gpt2" in e.value.hint and "distilbert" in e.value.hint


def test_algorithms_are_typed_modifiers_and_the_flat_spelling_maps_onto_them():
    from slimport.compress.modifiers import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig

    flat = api.make_config(bits=4, group_size=64, method="awq+gptq", gptq={"damp": 0.05})
    typed = api.make_config(bits=4, group_size=64, modifiers=[AWQConfig(), GPTQConfig(damp=0.05)])
    assert flat.modifiers == typed.modifiers == [AWQConfig(), GPTQConfig(damp=0.05)]
    assert flat == typed and typed.method == "awq+gptq" and typed.gptq["damp"] == 0.05
    yaml_form = api.make_config({"modifiers": [{"smoothquant": {"alpha": 0.8}}, "gptq"]})
    assert yaml_form.modifiers == [SmoothQuantConfig(0.8), GPTQConfig()]
    assert (yaml_form.method, yaml_form.smoothquant) == ("gptq", 0.8)
    assert api.make_config(method="awq").modifiers == [AWQConfig(), RTNConfig()]
    # what a config writes is what it reads back
    assert api.make_config(typed.to_dict()) == typed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gptq": {"dmap": 0.1}}, "unknown gptq option(s): dmap"),
        ({"awq": {"grid": 20, "clipping": True}}, "unknown awq option(s): clipping"),
        ({"modifiers": ["gptq", "rtn"]}, "rounds the weights exactly once"),
        ({"modifiers": ["gptq", "awq"]}, "must come before the weights are pruned or rounded"),
        ({"modifiers": [{"sparsify": {}}]}, "unknown quantization method 'sparsify'"),
        ({"method": "gptq", "modifiers": ["awq"]}, "method disagree with `modifiers`"),
    ],
)
def test_bad_modifiers_are_named(options, message):
    with pytest.raises(SlimportError, match=re.escape(message)) as e:
        api.make_config(**options)
    if "option(s)" in message:
        assert "damp" in e.value.hint or "max_tokens" in e.value.hint  # the valid keys


def test_four_bit_defaults_to_asymmetric_eight_bit_to_symmetric(tmp_path):
    from slimport.cli import build_parser

    assert api.make_config(bits=4, group_size=64).weights.symmetric is False
    assert api.make_config(bits=8).weights.symmetric is True
    assert api.make_config(bits=4, symmetric=True).weights.symmetric is True
    # an 8-bit recipe turned 4-bit by an option gets the 4-bit default
    recipe = tmp_path / "w8.yaml"
    recipe.write_text("quantization:\n  bits: 8\n")
    assert api.make_config(recipe, bits=4).weights.symmetric is False
    parser = build_parser()
    for flags, want in [([], None), (["--symmetric"], True), (["--asymmetric"], False)]:
        args = parser.parse_args(["quantize", "m", "o", "--bits", "4", *flags])
        assert args.symmetric is want


def test_cli_quantize_prints_sizes_and_writes_the_report(smollm2_hf, tmp_path, capsys):
    from slimport.cli import main

    assert main(["quantize", str(smollm2_hf), str(tmp_path / "q"), "--bits", "8", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "W8 per-channel RTN: 210 Linear layers quantized" in text and "MB ->" in text
    assert "transformers from_pretrained: loads it packed" in text  # what each consumer does
    report = json.loads((tmp_path / "q/quantization_report.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]
    assert any(
        c.startswith("transformers from_pretrained: loads it packed") for c in report["consumers"]
    )


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        c = api.make_config(r)
        assert c.needs_calibration and c.calib_data, r
