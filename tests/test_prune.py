"""`slimport prune` end to end on a small random Llama: the output has exactly the sparsity and
N:M pattern asked for, loads in plain transformers (float, or compressed-tensors when the kept
weights are quantized) with the logits slimport's own loader and the in-memory pipeline give,
and bad options are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from slimport.cli import main  # noqa: E402
from slimport.compress import pipeline  # noqa: E402
from slimport.compress.prune import api  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.compress.quant.config import QuantizationConfig  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)  # fmt: skip
    folder = tmp_path_factory.mktemp("llama") / "fp32"
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 128, (2, 32), generator=g)} for _ in range(2)]
    return folder, calib


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _block_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach()
        for n, m in model.model.layers.named_modules()
        if getattr(m, "weight", None) is not None and m.weight.dim() == 2
    }


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_pruned_folder_has_the_pattern_and_loads_in_transformers(llama, tmp_path, method, pattern):
    folder, calib = llama
    config = QuantizationConfig(modifiers=[{method: {"pattern": pattern}}])
    report = pipeline.quantize(folder, tmp_path / "out", config, calib, progress=False)
    model = _hf(tmp_path / "out")  # an ordinary float folder
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())
    weights = _block_weights(model)
    assert len(weights) == 14
    for name, w in weights.items():
        zeros = w == 0
        if pattern == "unstructured":
            per = zeros.sum(1) if method == "wanda" else zeros.sum()  # Wanda compares per row
            expect = w.shape[1] // 2 if method == "wanda" else w.numel() // 2
            assert (per == expect).all(), name
        else:
            n, m = map(int, pattern.split(":"))
            assert (zeros.reshape(w.shape[0], -1, m).sum(-1) == n).all(), name
    assert all(r["sparsity"] == 0.5 for r in report["modules"] if r["module"] != "lm_head")
    # the tail (final norm, tied head) is untouched
    ref = _hf(folder)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_sparsegpt_plus_gptq_folder_loads_in_transformers_and_slimport_alike(llama, tmp_path):
    folder, calib = llama
    config = QuantizationConfig(
        bits=4, group_size=32, modifiers=[{"sparsegpt": {"pattern": "2:4"}}, "gptq"]
    )
    pipeline.quantize(folder, tmp_path / "w4", config, calib, progress=False)
    qc = json.loads((tmp_path / "w4/config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    assert qc["sparsity_config"]["format"] == "dense"
    hf = _hf(tmp_path / "w4")
    ours, _ = load_simulated(tmp_path / "w4")
    # the very pipeline in memory, on a transformers model
    mem = pipeline.quantize_(_hf(folder), config, calib)
    ids = calib[0]["input_ids"]
    ref = _logits(ours, ids)
    assert (_logits(hf, ids) - ref).abs().max() <= TOL
    assert (_logits(mem, ids) - ref).abs().max() <= TOL
    for name, w in _block_weights(hf).items():  # GPTQ kept the pruned weights at zero
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name


def test_per_module_sparsity_and_ignore(llama, tmp_path):
    folder, calib = llama
    wanda = {"sparsity": 0.5, "per_module": {"self_attn": 0.25}, "ignore": [r"mlp\.down_proj"]}
    config = QuantizationConfig(modifiers=[{"wanda": wanda}])
    pipeline.quantize(folder, tmp_path / "out", config, calib, progress=False)
    for name, w in _block_weights(_hf(tmp_path / "out")).items():
        want = 0.0 if "down_proj" in name else 0.25 if "self_attn" in name else 0.5
        assert float((w == 0).float().mean()) == want, name


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity": 1.0}, "outside [0, 1)"),
        ({"sparsity": -0.1}, "outside [0, 1)"),
        ({"pattern": "2-4"}, "does not parse"),
        ({"pattern": "4:2"}, "does not parse"),
        ({"pattern": "0:4"}, "does not parse"),
        ({"pattern": "2:4:8"}, "does not parse"),
        ({"pattern": "2:4", "sparsity": 0.3}, "means sparsity 0.5"),
        ({"method": "lottery"}, "unknown pruning method"),
        ({"group_size": 64}, "need --bits"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(SlimportError, match=message.replace("[", r"\[").replace(")", r"\)")):
        api.make_config(**options)


def test_m_that_does_not_divide_an_input_is_refused_before_any_work(llama, tmp_path):
    folder, calib = llama
    config = QuantizationConfig(modifiers=[{"magnitude": {"pattern": "3:7"}}])
    with pytest.raises(SlimportError, match="7 does not divide the input size of model.layers.0"):
        pipeline.quantize(folder, tmp_path / "out", config, calib, progress=False)
    assert not (tmp_path / "out").exists()


def test_recipes_prune_first_and_must_prune(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 4\ngroup_size: 64\nmodifiers:\n"
                      "  - sparsegpt: {pattern: '2:4', damp: 0.02}\n  - gptq\n")  # fmt: skip
    config = api.make_config(recipe)
    assert config.pruning.nm == (2, 4) and config.pruning.damp == 0.02 and config.quantizes
    assert config.method == "sparsegpt+gptq"
    quant_only = tmp_path / "q.yaml"
    quant_only.write_text("bits: 4\nmethod: gptq\n")
    with pytest.raises(SlimportError, match="no pruning modifier"):
        api.make_config(quant_only)
    with pytest.raises(SlimportError, match="not both"):
        api.make_config(recipe, method="wanda")
    with pytest.raises(SlimportError, match="prune first"):
        QuantizationConfig(modifiers=["gptq", "sparsegpt"])
    with pytest.raises(SlimportError, match="2 pruning"):
        QuantizationConfig(modifiers=["wanda", "sparsegpt"])


def test_cli_prune_prints_the_per_module_table(llama, tmp_path, capsys):
    folder, _ = llama
    code = main(["prune", str(folder), str(tmp_path / "out"), "--method", "magnitude",
                 "--pattern", "2:4", "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | 0.5000 |" in out
    assert "14 Linear layers, 50.00% of their weights pruned" in out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "sparsity.mlp.down_proj  0.5" in capsys.readouterr().out
    code = main(["prune", str(folder), str(tmp_path / "bad"), "--sparsity", "1.5"])
    assert code == 3 and "outside [0, 1)" in capsys.readouterr().err
