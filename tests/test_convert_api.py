"""The convert/inspect API and CLI on a real model: reports, dtypes, sharding, user mappings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimport import api
from slimport.cli import build_parser, main
from slimport.io import safetensors as st


@pytest.fixture(scope="module")
def llama_dir(stories260k, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "stories-hf"
    api.convert(stories260k, out, to="hf", progress=False)
    return out


def test_every_subcommand_has_help(capsys):
    """Walks the parser's own subcommands, so a new one is checked without editing this test."""
    import argparse

    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 8  # inspect convert verify generate quantize eval finetune demo
    for cmd, sp in sub.choices.items():
        assert sp.get_default("fn") is not None, f"{cmd} has no handler"
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0, cmd
        assert capsys.readouterr().out.startswith("usage: slimport " + cmd), cmd
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert e.value.code == 0 and all(cmd in top for cmd in sub.choices)


def test_inspect_reports_format_family_and_counts(stories260k, capsys):
    info = api.inspect(stories260k)
    assert (
        info["format"] == "llama2c" and info["family"] == "llama" and info["dialect"] == "llama2c"
    )
    assert info["tensor_count"] == 47 and info["parameter_count"] == 260_032
    assert info["config"]["num_key_value_heads"] == 4
    assert main(["inspect", str(stories260k), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 260_032 * 4


def test_hf_round_trip_is_bit_exact_and_report_complete(llama_dir, tmp_path):
    report = api.convert(llama_dir, tmp_path / "again", to="hf", progress=False)
    a, b = (
        load_file(llama_dir / "model.safetensors"),
        load_file(tmp_path / "again/model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {t["target"] for t in report["tensors"]} == set(a)
    on_disk = json.loads((tmp_path / "again/conversion_report.json").read_text())
    assert on_disk["tensors"] == report["tensors"]


def test_bfloat16_stays_bfloat16_and_casts_are_explicit(llama_dir, tmp_path):
    api.convert(llama_dir, tmp_path / "bf16", to="hf", dtype="bfloat16", progress=False)
    t = load_file(tmp_path / "bf16/model.safetensors")
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    report = api.convert(tmp_path / "bf16", tmp_path / "bf16b", to="hf", progress=False)
    assert {x["dtype"] for x in report["tensors"]} == {"bfloat16"}
    assert all(x["ops"] == [] for x in report["tensors"])  # nothing cast without being asked
    report = api.convert(
        tmp_path / "bf16", tmp_path / "f32", to="hf", dtype="float32", progress=False
    )
    assert all(x["ops"] == ["Cast(float32)"] for x in report["tensors"])


def test_sharded_safetensors_read_and_write(llama_dir, tmp_path):
    model = api.load(llama_dir)
    planned = list(model.hub.values())
    files = st.write_sharded(tmp_path, planned, max_shard_size=300_000)
    assert "model.safetensors.index.json" in files and len(files) > 2
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    report = api.convert(tmp_path, tmp_path / "joined", to="hf", progress=False)
    assert report["tensor_count"] == 47
    a, b = (
        load_file(llama_dir / "model.safetensors"),
        load_file(tmp_path / "joined/model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_shard_is_named(llama_dir, tmp_path):
    model = api.load(llama_dir)
    files = st.write_sharded(tmp_path, list(model.hub.values()), max_shard_size=300_000)
    (tmp_path / files[1]).unlink()
    with pytest.raises(api.SlimportError, match=f"shard {files[1]} is missing"):
        api.load(tmp_path)


def test_user_mapping_renames_custom_layer_names(llama_dir, tmp_path):
    """A checkpoint with home-made names converts once the user maps them."""
    tensors = load_file(llama_dir / "model.safetensors")
    custom = {
        k.replace("model.layers.", "blocks.").replace("self_attn.", "attn."): v
        for k, v in tensors.items()
    }
    src = tmp_path / "custom"
    src.mkdir()
    save_file(custom, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(api.SlimportError, match="match no rule"):
        api.convert(src, tmp_path / "out", to="hf", progress=False)
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "'blocks.{}.attn': 'model.layers.{}.self_attn'\n'blocks.{}': 'model.layers.{}'\n"
    )
    report = api.convert(src, tmp_path / "out", to="hf", mapping=mapping, progress=False)
    assert "user mapping renamed" in report["notes"][0]
    out = load_file(tmp_path / "out/model.safetensors")
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in out)


def test_bare_base_model_under_head_model_config(tmp_path):
    """Like the official GPT-2 checkpoint: config says GPT2LMHeadModel, names lack `transformer.`."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    base = GPT2Model(cfg).eval()
    src = tmp_path / "gpt2"
    base.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))

    report = api.convert(src, tmp_path / "hf", to="hf", progress=False)
    assert any("prefix 'transformer.'" in n for n in report["notes"])
    assert all(t["target"].startswith("transformer.") for t in report["tensors"])
    lm = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(lm.transformer(ids).last_hidden_state, base(ids).last_hidden_state)
