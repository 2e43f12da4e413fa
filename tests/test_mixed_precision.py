"""Per-module weight schemes (`overrides` in a recipe): one checkpoint mixing W8 per channel and
W4 groups, each Linear stored in its own scheme, config.json giving each group its modules by
name, so transformers (compressed-tensors' loader) computes exactly what our pipeline computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("compressed_tensors")

from slimport.cli import main  # noqa: E402
from slimport.compress import pipeline  # noqa: E402
from slimport.compress.quant.config import QuantArgs, QuantizationConfig  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402

RECIPE = """\
quantization:
  bits: 4
  group_size: 16
  method: {method}
  protect: ['lm_head$', 'layers\\.1\\.mlp\\.down_proj$']
  overrides:
    'layers\\.0\\.self_attn\\.[qk]_proj$': {{bits: 8, granularity: channel}}
    'layers\\.1\\.mlp\\.': {{group_size: 32}}
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("llama") / "fp32"
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def calibration() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(2)]


def test_an_override_changes_only_the_modules_it_matches():
    c = QuantizationConfig(bits=4, group_size=16, overrides={r"q_proj$": {"bits": 8}})
    assert c.weights_for("model.layers.0.self_attn.q_proj") == QuantArgs(8, True, "group", 16)
    assert c.weights_for("model.layers.0.self_attn.k_proj") == c.weights
    assert c.weights == QuantArgs(4, False, "group", 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"q_proj$": {"bits": 16}}, "float module goes in `protect`"),
        ({"q_proj$": {"bitz": 8}}, "give a mapping of bits, group_size"),
        ({"q_proj$": {"bits": "8"}}, "is not an integer"),
        ({"(": {"bits": 8}}, "not a valid module pattern"),
        ({"q_proj$": {"group_size": -4}}, "positive group_size"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(SlimportError, match=message):
        QuantizationConfig(bits=4, group_size=16, overrides=overrides)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_quantize_recipe_with_overrides_gives_the_mixed_model(llama, tmp_path, method, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE.format(method=method))
    config = QuantizationConfig.from_yaml(recipe)
    calib = calibration()
    out = tmp_path / "q"
    report = pipeline.quantize(llama, out, config, calib, progress=False)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)

    def stored(name):  # (bits, groups per row) as the checkpoint holds them
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        return packed.shape[1] * 32 // 64, scale.shape[1]

    p = "model.layers"
    assert stored(f"{p}.0.self_attn.q_proj") == (8, 1)  # W8 per channel, 64 inputs
    assert stored(f"{p}.0.self_attn.v_proj") == (4, 64 // 16)  # the recipe's W4 g16
    assert stored(f"{p}.1.mlp.gate_proj") == (4, 64 // 32)  # W4 g32
    assert f"{p}.1.mlp.down_proj.weight" in tensors  # protected: float
    assert f"{p}.0.self_attn.k_proj.weight_zero_point" not in tensors  # W8 symmetric
    assert report["quantized_linears"] == 13
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 3
    # compressed-tensors' own decompressor, each module with the group config.json gives it
    # (exact names before the "Linear" class target), computes what our pipeline computed
    mem = pipeline.quantize_(AutoModelForCausalLM.from_pretrained(llama), config, calib)
    decoded = decoded_by_the_library(out, AutoModelForCausalLM.from_pretrained(llama))
    x = calib[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(decoded(x).logits, mem(x).logits, atol=1e-4, rtol=0)


def decoded_by_the_library(folder, model):
    """transformers 5.24's loader decompresses every dense module with the first group's
    scheme, so the groups are applied here as compressed-tensors (and vLLM) match them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.utils.match import match_targets
    from safetensors.torch import load_file

    qc = CTConfig.model_validate(
        json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    by_target = {t: s for s in qc.config_groups.values() for t in s.targets}
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors |= load_file(f)
    quantized = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in quantized}
    for name in quantized:
        scheme = by_target[match_targets(name, model.get_submodule(name), by_target)[0]]
        parts = {
            k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")
        }
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        state[name + ".weight"] = compressor.decompress(parts, scheme)["weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def test_cli_quantize_takes_the_recipe(llama, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE.format(method="rtn"))
    assert (
        main(["quantize", str(llama), str(tmp_path / "q"), "--recipe", str(recipe), "--quiet"]) == 0
    )
    saved = json.loads((tmp_path / "q/slimport_quantization.json").read_text())
    assert saved["overrides"]["layers\\.1\\.mlp\\."] == {"group_size": 32}


def test_an_override_matching_nothing_is_an_error(llama, tmp_path):
    config = QuantizationConfig(bits=4, group_size=16, overrides={"no_such_proj": {"bits": 8}})
    with pytest.raises(SlimportError, match="overrides pattern 'no_such_proj' matches no Linear"):
        pipeline.quantize(llama, tmp_path / "q", config, progress=False)


# ---------------------------------------------------------------- --report on quantize / prune


def _figures(html: str) -> list[str]:
    import re

    return re.findall(r'<figure class="plot" id="fig-([\w-]+)"><svg', html)


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_report_of_a_run_has_per_layer_errors_and_weight_histograms(llama, tmp_path, command):
    pytest.importorskip("matplotlib")
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE.format(method="rtn"))
    extra = ["--recipe", str(recipe)] if command == "quantize" else ["--method", "magnitude"]
    out, html = tmp_path / "q", tmp_path / "run.html"
    assert main([command, str(llama), str(out), *extra, "--quiet", "--report", str(html)]) == 0
    text = html.read_text()
    assert _figures(text) == ["layers", "weights", "activations"]
    assert "block 0" in text and "block 1" in text
    md = (tmp_path / "run.md").read_text()
    assert "![weight distributions" in md and (tmp_path / "run_files/weights.svg").is_file()
    assert "![output activations" in md and (tmp_path / "run_files/activations.svg").is_file()
    if command == "prune":
        assert "| module | sparsity | seconds |" in md


def test_report_activation_histograms_are_the_quantized_layers_outputs(llama, tmp_path):
    """W8A8 (dynamic per-token inputs): the "output" activations the report plots are what the
    in-memory quantized layer computes on the fp32 model's input to it; "fp32" the float layer's."""
    from transformers import AutoModelForCausalLM

    from slimport.compress.run_report import ACT_TOKENS, _activations, _ids

    out = tmp_path / "q"
    assert main(["quantize", str(llama), str(out), "--bits", "8", "--granularity", "channel",
                 "--activations", "dynamic", "--quiet"]) == 0  # fmt: skip
    cfg = json.loads((out / "quantization_report.json").read_text())["config"]
    name = "model.layers.1.mlp.down_proj"
    panels = _activations(llama, out, [name], cfg)
    fp32 = AutoModelForCausalLM.from_pretrained(llama).eval()
    mem = pipeline.quantize_(
        AutoModelForCausalLM.from_pretrained(llama), QuantizationConfig.from_dict(cfg)
    )
    seen = {}
    fp32.get_submodule(name).register_forward_hook(lambda m, a, y: seen.update(x=a[0], y=y))
    ids = _ids(llama, cfg, fp32.config)
    with torch.no_grad():
        fp32(input_ids=ids)
        want = mem.get_submodule(name)(seen["x"])
    (panel,) = panels.values()
    assert ids.shape == (1, min(ACT_TOKENS, fp32.config.max_position_embeddings))
    np.testing.assert_allclose(panel["fp32"], seen["y"].flatten().numpy(), atol=1e-6)
    np.testing.assert_allclose(panel["output"], want.flatten().numpy(), atol=1e-5)
    assert np.abs(panel["output"] - panel["fp32"]).max() > 1e-4  # the inputs were quantized


def test_report_histograms_decode_the_override_scheme(llama, tmp_path):
    """What the histograms show is what the pipeline computed, module by module, W8 or W4."""
    from transformers import AutoModelForCausalLM

    from slimport.compress.run_report import _decoded
    from slimport.io import safetensors

    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE.format(method="rtn"))
    out = tmp_path / "q"
    assert main(["quantize", str(llama), str(out), "--recipe", str(recipe), "--quiet"]) == 0
    config = QuantizationConfig.from_yaml(recipe)
    mem = pipeline.quantize_(AutoModelForCausalLM.from_pretrained(llama), config)
    index = out / "model.safetensors.index.json"
    ckpt = safetensors.read(index if index.is_file() else out / "model.safetensors")
    try:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.mlp.gate_proj"):  # fmt: skip
            expected = mem.get_submodule(name).weight
            torch.testing.assert_close(_decoded(out, ckpt, name), expected, atol=1e-6, rtol=0)
    finally:
        ckpt.close()
