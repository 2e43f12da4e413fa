"""Hostile or careless inputs to `slimport quantize`, in the style of test_hostile.py: each case
is refused with exactly one `slimport: error:` line naming the tensor, the recipe key or the
option, no traceback, and no output folder or partial left."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from test_hostile import assert_refused, cli, refused_in_process, tiny_llama

from slimport.cli import main
from slimport.errors import SlimportError

UP = "model.layers.0.mlp.up_proj.weight"  # [16, 8]: 16 rows of 8 input features


def _set(name: str, index, value: float):
    return lambda t: t[name].__setitem__(index, value)


# ------------------------------------------------------------------ scales


@pytest.mark.parametrize(
    "edit, options, needle",
    [
        # finite weights whose range overflows float32: max - min = 6e38 = inf
        (lambda t: t[UP][0, :2].copy_(torch.tensor([3e38, -3e38])), ["--bits", "4", "--group-size", "8"], "float32 scale"),
        (lambda t: t[UP][3].fill_(3.2e38).__setitem__(0, -3.2e38), ["--bits", "8", "--asymmetric"], "float32 scale"),
        (_set(UP, (2, 5), float("inf")), ["--bits", "4", "--group-size", "8"], "NaN or Inf"),
        (_set(UP, (2, 5), float("nan")), ["--bits", "8"], "NaN or Inf"),
        # --bits 16 casts: a weight beyond float16's 65504 would become inf
        (_set(UP, (0, 0), 1e6), ["--bits", "16"], "float16"),
    ],
    ids=["w4-range-overflow", "w8-row-overflow", "inf-weight", "nan-weight", "fp16-cast-overflow"],
)  # fmt: skip
def test_no_infinite_or_nan_scale_is_ever_stored(capsys, tmp_path, edit, options, needle):
    src = tiny_llama(tmp_path / "model", edit=edit)
    out = tmp_path / "out"
    refused_in_process(capsys, ["quantize", src, out, "--quiet", *options], out, UP, needle)


# (4-bit asymmetric is left out: compressed-tensors cannot unpack the zero points of this tiny
# model's 4-row k_proj, a single packed row, whatever the scales)
@pytest.mark.parametrize(
    "scheme", [["--bits", "8", "--asymmetric"], ["--bits", "4", "--symmetric"]]
)
def test_an_all_zero_group_gets_the_documented_safe_scale_and_stays_zero(tmp_path, scheme):
    from slimport.compress.quant.compressed import load_simulated

    src = tiny_llama(tmp_path / "model", edit=lambda t: t[UP][:, :4].zero_())  # half of each row
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet", *scheme, "--group-size", "4"]) == 0
    stored = {}
    for shard in out.glob("*.safetensors"):
        stored |= load_file(shard)
    scales = [v for k, v in stored.items() if k.endswith("_scale")]
    assert scales and all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in scales)
    up_scale = stored[UP.replace(".weight", ".weight_scale")]  # [16 rows, 2 groups]
    assert torch.equal(up_scale[:, 0], torch.full((16,), torch.finfo(torch.float32).eps))
    model, _ = load_simulated(out)
    w = model.get_submodule(UP.removesuffix(".weight")).weight
    assert torch.equal(w[:, :4], torch.zeros(16, 4)) and w[:, 4:].abs().sum() > 0


# ------------------------------------------------------------------ recipes

BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    "recipe, needle",
    [
        ("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB + "protect: *i\n", "alias"),
        ("bits: four\n", "bits: 'four' is not an integer"),
        ("bits: true\n", "bits: True is not an integer"),
        ("bits: 4\ngroup_size: -1\n", "group_size: -1"),
        ("ignore: 5\n", "ignore (slimport: protect)"),
        ("protect: 5\n", "protect: 5 is not a list of strings"),
        ("bits: 4\nbitz: 3\n", "unknown quantization option(s): bitz"),
        ("quantization: {bits: 4}\nbits: 8\n", "top-level key(s) bits"),
        ("method: gptq\ngptq: {damp: x}\n", "damp: 'x' is not a number"),
        ("symmetric: 1\n", "symmetric: 1 is not true/false"),
        ("[" * 20000, "nested too deeply"),
    ],
    ids=["alias-bomb", "bits-string", "bits-bool", "group-negative", "ignore-int", "protect-int",
         "unknown-key", "key-beside-quantization", "gptq-damp-string", "symmetric-int", "deep"],
)  # fmt: skip
def test_bad_recipes_are_refused_naming_the_key(capsys, tmp_path, recipe, needle):
    src = tiny_llama(tmp_path / "model")
    (tmp_path / "recipe.yaml").write_text(recipe)
    out = tmp_path / "out"
    argv = ["quantize", src, out, "--recipe", tmp_path / "recipe.yaml", "--quiet"]
    refused_in_process(capsys, argv, out, "recipe.yaml", needle)


def test_a_fifo_as_recipe_does_not_hang(tmp_path):
    src = tiny_llama(tmp_path / "model")
    os.mkfifo(tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    # a hang is forever: the bound only has to outlast a loaded machine's start of torch
    r = cli("quantize", src, out, "--recipe", tmp_path / "recipe.yaml", timeout=300)
    assert_refused(r.returncode, r.stderr, out, "recipe.yaml", "not a regular file")


# ------------------------------------------------------------------ group size


def test_group_size_not_dividing_a_linear_is_refused_before_any_weight_is_read(
    capsys, tmp_path, monkeypatch
):
    from slimport.compress.skeleton import Skeleton

    src = tiny_llama(tmp_path / "model")  # no tokenizer: tokenizing calibration text would fail
    (tmp_path / "calib.txt").write_text("some text\n" * 100)

    def read(*_):
        raise AssertionError("a weight was read before the group size was checked")

    monkeypatch.setattr(Skeleton, "materialize", read)
    out = tmp_path / "out"
    argv = ["quantize", src, out, "--bits", "4", "--group-size", "3", "--method", "gptq",
            "--calib-data", tmp_path / "calib.txt"]  # fmt: skip
    refused_in_process(
        capsys,
        argv,
        out,
        "--group-size",
        "model.layers.0.self_attn.q_proj",
        "8 input",
        "1, 2, 4, 8",
    )


def test_group_size_is_checked_for_models_quantized_in_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimport.compress.pipeline import quantize_
    from slimport.compress.quant.config import QuantizationConfig

    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))  # fmt: skip
    with pytest.raises(SlimportError, match=r"down_proj has 12 input features.*: 1, 2, 4\n"):
        quantize_(model, QuantizationConfig(bits=4, group_size=8))


# ------------------------------------------------------------------ output folder


def test_quantize_output_folder_is_new_or_replaced_as_a_whole(capsys, tmp_path):
    src = tiny_llama(tmp_path / "model")
    for target in (src, tmp_path):  # the input folder, and a folder holding it
        refused_in_process(
            capsys, ["quantize", src, target, "--overwrite"], None, "holds the input"
        )
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # another model's file
    refused_in_process(capsys, ["quantize", src, out, "--quiet"], None, "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]

    assert main(["quantize", str(src), str(out), "--quiet", "--overwrite"]) == 0
    assert "tokenizer.json" not in {p.name for p in out.iterdir()}
    assert (out / "quantization_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # --bits 16 is a cast through convert: the same rules
    refused_in_process(capsys, ["quantize", src, out, "--bits", "16"], None, "not empty")
    assert main(["quantize", str(src), str(out), "--bits", "16", "--overwrite"]) == 0
    assert (out / "conversion_report.json").is_file()
    assert not (out / "quantization_report.json").exists()
