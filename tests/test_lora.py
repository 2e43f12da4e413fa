"""LoRA in torch (through peft): adapters in peft's layout that peft loads, the update it means,
trainable-parameter accounting, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from slimport.cli import main
from slimport.compress import lora
from slimport.errors import SlimportError
from slimport.finetune.lora import LoraTrainSettings, finetune_lora

TINY = LoraTrainSettings(steps=3, batch_size=1, seq_len=16, eval_windows=2)
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module")
def text(shared):
    return shared / "data/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def trained(smollm2_hf, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    report = finetune_lora(smollm2_hf, out, text, train=TINY, progress=False)
    return out, report


def _probe(smollm2_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


def test_adapter_is_peft_layout_and_peft_applies_the_update_we_mean(trained, smollm2_hf):
    import peft

    out, report = trained
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "finetune_report.json",
    }  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    ids = torch.tensor([[1, 450, 2431, 310, 278, 3186, 338, 1781]])

    by_peft = peft.PeftModel.from_pretrained(_probe(smollm2_hf), out).eval()
    # the update by hand from the file: W + alpha/r * B @ A on every adapted layer
    by_hand = _probe(smollm2_hf)
    modules = dict(by_hand.named_modules())
    adapted = set()
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[name.replace("lora_A", "lora_B")]
            with torch.no_grad():
                modules[module].weight += torch.from_numpy(2.0 * (b @ a))
            adapted.add(module.rsplit(".", 1)[-1])
    assert adapted == set(TARGETS)
    assert any(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)  # it trained
    with torch.no_grad():
        want, got = by_hand(ids).logits, by_peft(ids).logits
        merged = lora.merge_and_unload(by_peft)(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (merged - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_trainable_parameters_are_the_lora_matrices_only(trained, smollm2_hf):
    _, report = trained
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv_dim = kv * h // cfg["num_attention_heads"]
    # rank * (in + out) per adapted layer: q, v, o, gate, up
    per_layer = 8 * ((h + h) + (h + kv_dim) + (h + h) + 2 * (h + inter))
    assert report["trainable_params"] == per_layer * cfg["num_hidden_layers"]
    assert report["trainable_percent"] < 1.5
    assert len(report["losses"]) == TINY.steps
    assert report["held_out_perplexity_after"] < report["held_out_perplexity_before"]


def test_cli_lora_writes_the_adapter(smollm2_gguf, text, tmp_path, capsys):
    out = tmp_path / "ad"  # from the GGUF file: converted to a Hugging Face folder on the way
    argv = ["finetune", str(smollm2_gguf), "--lora", "--data", str(text), "--out", str(out),
            "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--rank", "2",
            "--targets", r".*\.q_proj"]  # fmt: skip
    assert main(argv) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    names = load_file(str(out / "adapter_model.safetensors"))
    assert names and all(".self_attn.q_proj.lora_" in n for n in names)
    assert {v.shape[0] for k, v in names.items() if "lora_A" in k} == {2}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_gguf)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # the converted copy is gone


def test_targets_matching_nothing_are_an_error(smollm2_hf, text, tmp_path):
    with pytest.raises(SlimportError, match=r"'.*\\.qkv' match none of its .* linear layers"):
        finetune_lora(
            smollm2_hf, tmp_path / "x", text, lora.LoraSettings(targets=r".*\.qkv"), TINY,
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [("", "empty.txt", "the file is empty"), ("some words " * 500, "wiki.test.raw", "test split")],
)
def test_bad_training_text_is_an_error(smollm2_hf, tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SlimportError, match=message):
        finetune_lora(smollm2_hf, tmp_path / "out", path, train=TINY, progress=False)


def test_peft_names_round_trip_and_refuse_strangers():
    ours = [
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.mlp.up_proj.lora_B.weight",
    ]
    peft_names = lora.rename(ours, to_peft=True)
    assert peft_names[ours[0]] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert lora.rename(peft_names.values(), to_peft=False) == {v: k for k, v in peft_names.items()}
    with pytest.raises(SlimportError, match="not a LoRA A/B weight"):
        lora.rename(["model.layers.0.self_attn.q_proj.weight"], to_peft=True)


def test_killed_run_resumes_to_the_same_losses(smollm2_hf, text, tmp_path):
    train = LoraTrainSettings(steps=4, batch_size=1, seq_len=16, eval_windows=1)
    straight = finetune_lora(smollm2_hf, tmp_path / "a", text, train=train, progress=False)
    ckpt = tmp_path / "ckpt"
    first = LoraTrainSettings(steps=2, batch_size=1, seq_len=16, eval_windows=1, checkpoint_every=2)
    finetune_lora(smollm2_hf, tmp_path / "b", text, train=first, progress=False, checkpoint=ckpt)
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 2
    resumed = finetune_lora(
        smollm2_hf, tmp_path / "c", text, train=train, progress=False, checkpoint=ckpt
    )
    assert resumed["losses"] == straight["losses"]
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k], c[k]) for k in a)
    with pytest.raises(SlimportError, match="checkpoint of another model or trainable set"):
        finetune_lora(
            smollm2_hf, tmp_path / "d", text, lora.LoraSettings(rank=4), train,
            progress=False, checkpoint=ckpt,
        )  # fmt: skip
