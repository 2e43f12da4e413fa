"""Bad input gets one clear error naming the file, tensor or option, exit code 3, and no output."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from slimport import api
from slimport.cli import main


@pytest.fixture(scope="module")
def llama_dir(stories260k, tmp_path_factory):
    """A real small HF Llama folder (stories260K converted once)."""
    out = tmp_path_factory.mktemp("bad") / "stories-hf"
    api.convert(stories260k, out, to="hf", progress=False)
    return out


def variant(llama_dir, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of the model folder with its tensors or config edited."""
    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def fails(capsys, tmp_path, src, *needles, extra=()):
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), "--to", "hf", *extra])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("slimport: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out.exists(), "a failed conversion must not leave output behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], (
        "temp files left behind"
    )
    return err


def test_missing_tensor_is_named(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    fails(capsys, tmp_path, src, "missing", "model.layers.3.mlp.up_proj.weight")


def test_extra_tensor_is_named(llama_dir, tmp_path, capsys):
    def add(t):
        t["model.layers.9.self_attn.q_proj.weight"] = t[
            "model.layers.0.self_attn.q_proj.weight"
        ].clone()

    src = variant(llama_dir, tmp_path, add)
    fails(capsys, tmp_path, src, "match no rule", "model.layers.9.self_attn.q_proj.weight")


def test_shape_mismatch_is_named_and_can_be_allowed_explicitly(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path, edit_config=lambda c: c.update(intermediate_size=170))
    fails(
        capsys, tmp_path, src, "shape mismatch", "mlp.gate_proj.weight", "--ignore-mismatched-sizes"
    )
    report = api.convert(
        src, tmp_path / "kept", to="hf", ignore_mismatched_sizes=True, progress=False
    )
    assert any("kept mismatched sizes" in n for n in report["notes"])


def test_unknown_architecture(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path, edit_config=lambda c: c.update(model_type="mamba9"))
    fails(capsys, tmp_path, src, "unknown architecture", "mamba9", "supported model types")


def test_wrong_architecture_config(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path, edit_config=lambda c: c.update(model_type="qwen2"))
    # Qwen2 has q/k/v biases: the Llama checkpoint lacks them
    fails(capsys, tmp_path, src, "missing", "self_attn.q_proj.bias")


def test_missing_config(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path)
    (src / "config.json").unlink()
    fails(capsys, tmp_path, src, "no model config", "--config")


def test_truncated_safetensors(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    fails(capsys, tmp_path, src, "truncated", "model.safetensors")


def test_corrupt_safetensors_header(llama_dir, tmp_path, capsys):
    src = variant(llama_dir, tmp_path)
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#not json!!!"
    f.write_bytes(bytes(data))
    fails(capsys, tmp_path, src, "corrupt safetensors header", "model.safetensors")


def test_tiny_file_is_not_safetensors(tmp_path, capsys):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abc")
    fails(capsys, tmp_path, f, "truncated", "x.safetensors")


def test_unknown_target_and_dtype_options(llama_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", str(llama_dir), str(tmp_path / "o"), "--to", "tflite"])
    with pytest.raises(api.SlimportError, match="unknown --dtype"):
        api.convert(llama_dir, tmp_path / "o", to="hf", dtype="int3")
    assert not (tmp_path / "o").exists()


def test_mapping_pattern_that_matches_nothing(llama_dir, tmp_path, capsys):
    m = tmp_path / "map.yaml"
    m.write_text("'transformer.h.{}.attn': 'model.layers.{}.self_attn'\n")
    fails(capsys, tmp_path, llama_dir, "match no tensor", extra=("--mapping", str(m)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_not_writable_as_user(llama_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code = main(["convert", str(llama_dir), str(locked / "out"), "--to", "hf"])
    assert code == 3 and "not writable" in capsys.readouterr().err


def test_output_path_under_a_file(llama_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["convert", str(llama_dir), str(blocker / "out"), "--to", "hf"])
    err = capsys.readouterr().err
    assert code == 3 and "not writable" in err and str(blocker) in err
