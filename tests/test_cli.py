"""The command line as a user meets it: exit codes that tell outcomes apart, help with defaults
and an example for every command, names instead of paths."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimport import cli
from slimport.cli import main
from slimport.errors import SlimportError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _slimport(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "slimport.cli", *argv], capture_output=True, text=True, env=env, **kw
    )


# --- exit codes --------------------------------------------------------------------------------


def test_exit_codes_are_distinct_and_documented_in_the_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    codes = [cli.OK, cli.FAILED, cli.USAGE, cli.REFUSED, cli.CRASHED, cli.INTERRUPTED]
    assert codes == [0, 1, 2, 3, 4, 130]
    top = cli.build_parser().format_help()
    for code, what in cli.EXIT_CODES.items():
        assert f"{code:<4} {what}" in top
    assert "SLIMPORT_DEBUG=1" in top


def test_a_usage_error_exits_2_and_a_refused_input_3(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])  # no PATH: argparse's own error
    assert e.value.code == cli.USAGE
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "absent.safetensors")]) == cli.REFUSED
    err = capsys.readouterr().err
    assert err.startswith("slimport: error: ") and "absent.safetensors" in err
    assert "Traceback" not in err


def test_a_crash_is_one_line_with_a_debug_hint_and_exit_4(monkeypatch, capsys, stories260k):
    from slimport import api

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "inspect", broken)
    monkeypatch.delenv("SLIMPORT_DEBUG", raising=False)
    assert main(["inspect", str(stories260k)]) == cli.CRASHED
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "SLIMPORT_DEBUG=1" in err
    assert "Traceback" not in err
    monkeypatch.setenv("SLIMPORT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):  # the traceback, for the bug report
        main(["inspect", str(stories260k)])


def test_ctrl_c_exits_130(monkeypatch, capsys, stories260k):
    from slimport import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect", interrupted)
    assert main(["inspect", str(stories260k)]) == cli.INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_json_into_a_pipe_closed_early_prints_no_traceback(stories260k):
    # inspect's JSON made larger than a pipe's buffer, so `head -1` leaves while it writes
    code = (
        "import sys; from slimport import api, cli; real = api.inspect;"
        "api.inspect = lambda *a: {**real(*a), 'padding': ['x' * 100] * 5000};"
        f"sys.exit(cli.main(['inspect', {str(stories260k)!r}, '--json']))"
    )
    run = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "{code}" | head -1; exit ${{PIPESTATUS[0]}}'],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert run.stdout == "{\n"
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert run.returncode == 0


def test_version():
    from slimport import __version__

    run = _slimport("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"slimport {__version__}"


# --- help --------------------------------------------------------------------------------------


def _subcommands():
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices.items()


FLAGS = ("_StoreTrueAction", "_StoreFalseAction", "_HelpAction", "BooleanOptionalAction")


@pytest.mark.parametrize("name,parser", _subcommands(), ids=[n for n, _ in _subcommands()])
def test_every_command_help_shows_each_default_and_an_example(name, parser):
    text = parser.format_help()
    assert f"example: slimport {name}" in text, f"{name}: no example in the epilog"
    for action in parser._actions:
        hidden = action.help == argparse.SUPPRESS  # a deprecated spelling
        if not action.option_strings or type(action).__name__ in FLAGS or action.required or hidden:
            continue
        shown = parser._get_formatter()._get_help_string(action)
        assert "default" in shown, f"{name} {action.option_strings[0]}: no default in {shown!r}"


def test_help_lists_the_source_formats_and_explains_the_two_mindspore_dialects():
    from slimport.io.formats import FORMATS

    helps = dict(_subcommands())
    convert = helps["convert"].format_help()
    assert all(f in convert for f in FORMATS)
    assert "MindFormers" in convert and "embedding_table" in convert and "attention.wq" in convert


# --- finding a model ---------------------------------------------------------------------------


def test_models_lists_the_installed_model_packages_by_name(minilm_dir, smollm2_gguf, capsys):
    assert main(["models", "--json"]) == 0
    found = {m["name"]: m["path"] for m in json.loads(capsys.readouterr().out)}
    assert Path(found["minilm"]) == minilm_dir and Path(found["smollm2"]) == smollm2_gguf


def test_a_name_works_wherever_a_path_does(stories260k, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # names work from any working directory
    assert main(["inspect", "stories260k", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["path"]) == stories260k.resolve()
    from slimport.io.locate import resolve_model

    assert resolve_model("STORIES260K") == resolve_model(stories260k)


def test_an_unknown_name_lists_the_known_ones(capsys):
    assert main(["inspect", "smollm3"]) == cli.REFUSED
    err = capsys.readouterr().err
    assert "smollm3: no such file or folder, nor a model name" in err and "minilm, smollm2" in err


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, minilm_dir):
    """A Hugging Face cache holding `sentence-transformers/all-MiniLM-L6-v2` as the Hub lays it
    out (refs/main -> snapshots/<commit>/ files)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        (snap / name).symlink_to(minilm_dir / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snap


def test_a_hub_id_reads_from_the_local_cache_offline(hub_cache, capsys):
    assert main(["inspect", "sentence-transformers/all-MiniLM-L6-v2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(hub_cache / "model.safetensors") and info["family"] == "bert"


def test_a_hub_id_not_cached_offline_is_one_clear_error(hub_cache, capsys):
    assert main(["convert", "org/not-cached", str(hub_cache.parent / "o"), "--to", "hf"]) == 3
    err = capsys.readouterr().err
    assert err.count("slimport: error:") == 1 and "Traceback" not in err
    assert "org/not-cached" in err and "not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err and "unset HF_HUB_OFFLINE" in err


# --- fail early --------------------------------------------------------------------------------


def test_group_size_128_on_smollm2_is_refused_before_any_weight_is_read(
    smollm2_gguf, tmp_path, capsys, monkeypatch
):
    from slimport.compress.skeleton import Skeleton

    def read(*_):
        raise AssertionError("a weight was read before the group size was checked")

    monkeypatch.setattr(Skeleton, "materialize", read)
    out = tmp_path / "q"
    assert main(["quantize", "smollm2", str(out), "--bits", "4", "--group-size", "128"]) == 3
    err = capsys.readouterr().err
    assert "--group-size" in err and "576 input features" in err and "Traceback" not in err
    assert "32, 48, 64, 96, 192" in err  # the sizes that would work
    assert not out.exists()


# --- machine-readable output -------------------------------------------------------------------


def test_convert_json_is_alone_on_stdout_while_the_work_prints(
    stories260k, tmp_path, capfd, monkeypatch
):
    from slimport import api

    real = api.convert

    def chatty(*a, **k):  # a library printing while it works, in Python and at the fd level
        print("chatter from python")
        os.write(1, b"chatter from C\n")
        return real(*a, **k)

    monkeypatch.setattr(api, "convert", chatty)
    assert main(["convert", "stories260k", str(tmp_path / "hf"), "--to", "hf", "--json"]) == 0
    out, err = capfd.readouterr()
    report = json.loads(out)
    assert report["target"] == "hf" and report["tensor_count"] == 47
    assert "chatter from python" in err and "chatter from C" in err


def test_quantize_json_prints_the_report(stories260k, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "stories260k", str(out), "--bits", "8", "--json", "--quiet"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized_linears"] == 5 * 7 and report["config"]["bits"] == 8


# --- recipes -----------------------------------------------------------------------------------


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from slimport.compress.api import make_config

    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("quantization:\n  method: gptq\n  calib_data: ../data/c.txt\n")  # fmt: skip
    monkeypatch.chdir(tmp_path / "data")  # anywhere but the project
    config = make_config(tmp_path / "recipes" / "r.yaml")
    assert Path(config.calib_data) == tmp_path / "data" / "c.txt"


def test_llm_compressor_names_are_read_in_recipes(tmp_path):
    from slimport.compress.api import make_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "scheme: W4A16\nignore: [lm_head, 're:.*mlp\\.down_proj$']\n"
        "num_calibration_samples: 8\nmax_seq_length: 128\n"
    )
    c = make_config(recipe)
    assert (c.bits, c.group_size, c.granularity, c.symmetric) == (4, 128, "group", True)
    assert (c.num_samples, c.seq_len) == (8, 128)
    assert c.is_protected("lm_head") and c.is_protected("model.layers.3.mlp.down_proj")
    assert not c.is_protected("model.layers.3.mlp.up_proj") and not c.is_protected("xlm_head")
    assert make_config(recipe, protect=["^x$"]).protect == ["^x$"]  # an option still wins
    recipe.write_text("num_calibration_samples: 8\nnum_samples: 16\n")
    with pytest.raises(SlimportError, match="num_samples given twice"):
        make_config(recipe)


def test_calib_method_is_the_deprecated_spelling_of_observer(capsys):
    parser = cli.build_parser()
    new = parser.parse_args(["quantize", "m", "o", "--observer", "mse"])
    old = parser.parse_args(["quantize", "m", "o", "--calib-method", "mse"])
    assert new.observer == old.observer == "mse"
    assert "--calib-method is deprecated, use --observer" in capsys.readouterr().err


def test_to_gguf_may_name_the_output_file(stories260k, tmp_path, capsys):
    from slimport.io.auto import open_checkpoint

    out = tmp_path / "gguf" / "stories-f16.gguf"
    argv = ["convert", "stories260k", str(out), "--to", "gguf", "--gguf-type", "f16", "--quiet"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["stories-f16.gguf"]  # no partials
    with open_checkpoint(out) as ckpt:
        assert ckpt.format == "gguf" and ckpt.metadata["gguf_types"]
    assert main(argv) == cli.REFUSED  # an existing file is kept unless --overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_finetune_out_reuses_the_cached_model(
    sst2_classifier, minilm_dir, tmp_path, monkeypatch, capsys
):
    import slimport.finetune as ft

    def train(*a, **k):
        raise AssertionError("trained again although the cache holds these settings")

    monkeypatch.setattr(ft, "finetune", train)
    out = tmp_path / "m"
    assert main(["finetune", "minilm", "--recipe", "ci", "--out", str(out)]) == 0
    assert str(sst2_classifier) in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (
        sst2_classifier / "model.safetensors"
    ).read_bytes()
