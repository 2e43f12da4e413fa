"""Hostile or careless inputs, one test per class: each builds such a file and checks that slimport
refuses it with exactly one `slimport: error:` line naming the file and the field, no traceback,
and no output folder or partial left; nothing outside the model folder reaches any output."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from slimport import arch
from slimport.cli import main
from slimport.io import safetensors
from slimport.io.base import Ready
from slimport.io.hf import model_class

SRC = Path(__file__).resolve().parents[1] / "src"
SECRET = b"OUTSIDE-THE-MODEL-FOLDER:" + bytes(range(256)) * 4

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
    "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 16,
    "tie_word_embeddings": False,
}  # fmt: skip


def tiny_llama(folder: Path, config: dict | None = None, edit=None) -> Path:
    """A random 1-layer Llama HF folder; `edit(tensors)` may corrupt it, `config` replaces its config."""
    folder.mkdir(parents=True, exist_ok=True)
    family, cfg = arch.resolve(CONFIG, "test")
    torch.manual_seed(0)
    tensors = {n: torch.randn(s) for n, s in family.hub_tensors(cfg).items()}
    if edit:
        edit(tensors)
    safetensors.write(folder / "model.safetensors", [Ready(n, t) for n, t in tensors.items()])
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    return folder


def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real command in a child process (signals, exit codes and stderr as a user sees them)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "slimport.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused(code: int, err: str, out: Path | None, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("slimport: error:")]
    assert code == 3, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def refused_in_process(capsys, argv: list, out: Path | None, *needles: str) -> None:
    code = main([str(a) for a in argv])
    assert_refused(code, capsys.readouterr().err, out, *needles)


# ------------------------------------------------------------------ 1. path confinement


def _h5_external_storage(folder: Path, outside: Path) -> Path:
    with h5py.File(folder / "tf_model.h5", "w") as f:
        f.create_dataset(
            "w", shape=(len(SECRET),), dtype="u1", external=[(str(outside), 0, len(SECRET))]
        )
    return folder / "tf_model.h5"


def _h5_external_link(folder: Path, outside: Path) -> Path:
    other = outside.parent / "other.h5"
    with h5py.File(other, "w") as f:
        f["w"] = np.frombuffer(SECRET, dtype="u1")
    with h5py.File(folder / "tf_model.h5", "w") as f:
        f.attrs["layer_names"] = [b"layer"]
        f.create_group("layer").attrs["weight_names"] = [b"w"]
        f["layer"]["w"] = h5py.ExternalLink(str(other), "/w")
    return folder / "tf_model.h5"


def _index(folder: Path, shard: str) -> Path:
    tiny_llama(folder / "real")
    names = safetensors.read(folder / "real" / "model.safetensors").names()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    return index


def _index_absolute(folder: Path, outside: Path) -> Path:
    tiny_llama(outside.parent / "elsewhere")
    return _index(folder, str(outside.parent / "elsewhere" / "model.safetensors"))


def _index_dotdot(folder: Path, outside: Path) -> Path:
    tiny_llama(outside.parent / "elsewhere")
    return _index(folder, "../elsewhere/model.safetensors")


def _index_symlink(folder: Path, outside: Path) -> Path:
    tiny_llama(outside.parent / "elsewhere")
    (folder / "shard.safetensors").symlink_to(outside.parent / "elsewhere" / "model.safetensors")
    return _index(folder, "shard.safetensors")


@pytest.mark.parametrize(
    "build, needle",
    [
        (_h5_external_storage, "external storage"),
        (_h5_external_link, "external link"),
        (_index_absolute, "outside the model folder"),
        (_index_dotdot, "outside the model folder"),
        (_index_symlink, "outside the model folder"),
    ],
    ids=[
        "h5-external-storage",
        "h5-external-link",
        "index-absolute",
        "index-dotdot",
        "index-symlink",
    ],
)
def test_nothing_outside_the_model_folder_is_read(capsys, tmp_path, build, needle):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(SECRET)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    src = build(folder, outside)
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), "--to", "hf"])
    captured = capsys.readouterr()
    assert_refused(code, captured.err, out, str(src.name), needle)
    assert SECRET[:25].decode() not in captured.out + captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".h5"]
    assert not any(SECRET in p.read_bytes() for p in written if p != outside)


# ------------------------------------------------------------------ 2. bounded reads

BOUNDED_CASES = {
    "llama2c-layers": ("stories.bin", "implies"),
    "gguf-block-count": ("model.gguf", "num_hidden_layers"),
    "config-layers": ("model", "num_hidden_layers"),
    "h5-unallocated": ("tf_model.h5", "declares"),
    "pickle-stride0": ("pytorch_model.bin", "storage"),
    "pickle-storage-lies": ("pytorch_model.bin", "declares 255 elements"),
    "safetensors-shape-wraps": ("wrap.safetensors", "elements"),
    "safetensors-overlap": ("overlap.safetensors", "overlap"),
}


def _build_bounded(case: str, path: Path) -> None:
    if case == "llama2c-layers":  # 28-byte header declaring 2^31-1 layers
        path.write_bytes(struct.pack("<7i", 8, 16, 2**31 - 1, 2, 1, 32, 16) + bytes(1000))
    elif case == "gguf-block-count":
        import gguf

        w = gguf.GGUFWriter(path, "llama")
        w.add_uint32("llama.block_count", 2**32 - 1)
        for key in (
            "vocab_size",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "context_length",
        ):
            w.add_uint32(f"llama.{key}", 8)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_tensor("token_embd.weight", np.zeros((32, 8), dtype=np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    elif case == "config-layers":
        tiny_llama(path, {**CONFIG, "num_hidden_layers": 10**9})
    elif case == "h5-unallocated":  # 5M x 64 floats declared, nothing stored
        with h5py.File(path, "w") as f:
            f.create_dataset("w", shape=(5_000_000, 64), dtype="f4")
    elif case == "pickle-stride0":  # one stored float viewed as 5M x 64
        torch.save({"w": torch.zeros(1).expand(5_000_000, 64)}, path)
    elif case == "pickle-storage-lies":  # a 6-float storage whose pickle declares 255 floats
        torch.save({"w": torch.zeros(6)}, path)
        with zipfile.ZipFile(path) as z:
            members = {i.filename: z.read(i) for i in z.infolist()}
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                if name.endswith("data.pkl"):
                    data, n = re.subn(rb"(cpuq.)K\x06t", lambda m: m[1] + b"K\xfft", data)
                    assert n == 1
                z.writestr(name, data)
    elif case == "safetensors-shape-wraps":  # 2^33 * 2^31 = 2^64 wraps to 0 in int64
        raw_safetensors(
            path, {"w": {"dtype": "F32", "shape": [2**33, 2**31], "data_offsets": [0, 0]}}
        )
    elif case == "safetensors-overlap":
        span = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
        raw_safetensors(path, {"a": span, "b": span}, bytes(16))
    if path.suffix in (".h5", ".bin") and case != "llama2c-layers":
        (path.parent / "config.json").write_text(json.dumps(CONFIG))


def test_declared_sizes_are_checked_against_the_bytes_present(tmp_path):
    """All cases in one child process: its peak RSS must stay < 1 GB. A loop over a declared
    count (2^31 layers) would outlast the child's timeout; no timing assert beyond that."""
    argv, outs = [], []
    for case, (name, _) in BOUNDED_CASES.items():
        (tmp_path / case).mkdir()
        _build_bounded(case, tmp_path / case / name)
        outs.append(tmp_path / case / "out")
        argv.append(["convert", str(tmp_path / case / name), str(outs[-1]), "--to", "hf"])
    script = (
        "import json, sys\nfrom slimport.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    print(main(argv), flush=True)\n"
        "    print('--- case end', file=sys.stderr, flush=True)\n"
        # VmHWM, not ru_maxrss: Linux carries the forking pytest's peak over exec into the latter
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    *results, peak_kb = r.stdout.split("\n")[:-1]
    errors = r.stderr.split("--- case end\n")
    for (name, field), code, err, out in zip(
        BOUNDED_CASES.values(), results, errors, outs, strict=False
    ):
        assert_refused(int(code), err, out, name, field)
    assert len(results) == len(BOUNDED_CASES), r.stderr
    assert int(peak_kb) < 1024 * 1024, f"peak RSS {int(peak_kb) // 1024} MB"


# ------------------------------------------------------------------ 3. wrong success


@pytest.mark.parametrize(
    "config, edit, needle",
    [
        ({**CONFIG, "num_attention_heads": 0}, None, "num_attention_heads=0"),
        ({**CONFIG, "hidden_size": "8"}, None, "hidden_size='8'"),
        ({**CONFIG, "num_hidden_layers": 1.5}, None, "num_hidden_layers=1.5"),
        ({**CONFIG, "num_key_value_heads": True}, None, "num_key_value_heads=True"),
        ({**CONFIG, "architectures": ["pipeline"]}, None, "architectures"),
        (None, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(32, 8, dtype=torch.int32)}), "model.embed_tokens.weight"),
        (None, lambda t: t.update({"model.norm.weight": torch.ones(8, dtype=torch.bool)}), "model.norm.weight"),
    ],
    ids=["heads-0", "size-string", "layers-float", "heads-bool", "architectures-any-attribute", "int-embedding", "bool-norm"],
)  # fmt: skip
def test_configs_and_tensors_of_the_wrong_type_are_refused(capsys, tmp_path, config, edit, needle):
    src = tiny_llama(tmp_path / "model", config, edit)
    out = tmp_path / "out"
    refused_in_process(capsys, ["convert", src, out, "--to", "hf"], out, needle)


def test_only_known_transformers_model_classes_are_instantiated():
    assert model_class("LlamaForCausalLM").__name__ == "LlamaForCausalLM"
    for name in ("pipeline", "set_seed", "AutoTokenizer", "PreTrainedModel", "__import__", ["x"]):
        with pytest.raises(Exception, match="not a transformers model class"):
            model_class(name)


# ------------------------------------------------------------------ 4. output folder


def test_output_folder_is_new_or_replaced_as_a_whole(capsys, tmp_path):
    src = tiny_llama(tmp_path / "model")
    refused_in_process(
        capsys, ["convert", src, src, "--to", "hf", "--overwrite"], None, "holds the input"
    )
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # another model's file
    refused_in_process(capsys, ["convert", src, out, "--to", "hf"], None, "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]

    dead = tmp_path / ".out.999999999-x.partial"  # left by a killed run: no such pid
    dead.mkdir()
    alive = tmp_path / f".out.{os.getpid()}-y.partial"  # a live run's
    alive.mkdir()
    assert main(["convert", str(src), str(out), "--to", "hf", "--overwrite"]) == 0
    assert "tokenizer.json" not in {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").is_file()
    assert not dead.exists() and alive.exists()


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    src = tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    slow = (
        "import sys, time\nimport slimport.io.safetensors as st\nwrite = st.write\n"
        "st.write = lambda *a, **k: (write(*a, **k), time.sleep(120))\n"
        "from slimport.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-c", slow, "convert", str(src), str(out), "--to", "hf"],
                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*.partial/model.safetensors")):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 143, err
    assert "slimport: terminated" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))


# ------------------------------------------------------------------ 5. errors, not tracebacks


def _deep_json(path):
    raw_safetensors(path, b"[" * 100_000 + b"]" * 100_000)


def _shape_string(path):
    raw_safetensors(path, {"w": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 0]}})


def _offsets_strings(path):
    raw_safetensors(
        path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, bytes(4)
    )


@pytest.mark.parametrize(
    "build, needle",
    [
        (_deep_json, "nested too deeply"),
        (_shape_string, "shape"),
        (_offsets_strings, "data_offsets"),
    ],
    ids=["deep-nesting", "shape-string", "offsets-strings"],
)
def test_malformed_headers_are_errors(capsys, tmp_path, build, needle):
    src = tmp_path / "bad.safetensors"
    build(src)
    out = tmp_path / "out"
    refused_in_process(capsys, ["convert", src, out, "--to", "hf"], out, "bad.safetensors", needle)


def test_fifo_or_folder_where_a_file_is_expected_does_not_hang(capsys, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")  # opening it for reading would block forever
    out = tmp_path / "out"
    r = cli("convert", folder, out, "--to", "hf", timeout=30)
    assert_refused(r.returncode, r.stderr, out, "model.safetensors", "not a regular file")
    os.unlink(folder / "model.safetensors")
    tiny_llama(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    refused_in_process(capsys, ["inspect", folder], None, "config.json", "a folder")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "M", "--prompt", "x", "--runtime", "torch", "--max-new-tokens", "-5"], "--max-new-tokens -5"),
        (["generate", "M", "--prompt", "x", "--runtime", "torch", "--temperature", "-1"], "--temperature -1"),
        (["generate", "M", "--prompt", "x", "--runtime", "torch", "--top-p", "2.0"], "--top-p 2.0"),
        (["eval", "M", "--task", "sst2", "--threads", "-1"], "--threads -1"),
        (["verify", "M", "M", "--json", "FOLDER"], "--json"),
        (["convert", "M", "OUT", "--to", "hf", "--allow-missing", "(unclosed"], "--allow-missing"),
    ],
    ids=["max-new-tokens", "temperature", "top-p", "threads", "json-folder", "allow-missing-regex"],
)  # fmt: skip
def test_bad_options_are_errors_before_the_run(capsys, tmp_path, argv, needle):
    src = tiny_llama(tmp_path / "model")
    (tmp_path / "FOLDER").mkdir()
    subst = {"M": src, "OUT": tmp_path / "out", "FOLDER": tmp_path / "FOLDER"}
    refused_in_process(capsys, [subst.get(a, a) for a in argv], tmp_path / "out", needle)


@pytest.mark.parametrize(
    "edit, extra, needle",
    [
        (lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), 1e6), ["--dtype", "float16"], "float16"),
        (lambda t: t["model.norm.weight"].__setitem__(3, float("nan")), [], "NaN or Inf"),
        (lambda t: t["lm_head.weight"].__setitem__((1, 1), float("inf")), ["--dtype", "bfloat16"], "NaN/Inf"),
    ],
    ids=["fp16-overflow", "nan-in-source", "inf-in-source"],
)  # fmt: skip
def test_non_finite_weights_are_refused_naming_the_tensor(capsys, tmp_path, edit, extra, needle):
    src = tiny_llama(tmp_path / "model", edit=edit)
    out = tmp_path / "out"
    refused_in_process(capsys, ["convert", src, out, "--to", "hf", *extra], out, "tensor", needle)


def test_a_corrupt_h5_that_makes_libhdf5_loop_is_refused_in_bounded_time(tmp_path, monkeypatch):
    """A fuzzed tf_model.h5 whose string attribute sends libhdf5 into an endless loop (holding
    the GIL): its metadata is read in a child process with a CPU limit, then refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    src = folder / "tf_model.h5"
    src.write_bytes(
        (Path(__file__).parent / "hostile_inputs" / "h5-attribute-loop.h5").read_bytes()
    )
    monkeypatch.setenv("SLIMPORT_H5_TIMEOUT", "1")  # CPU seconds; a sane h5 needs ~0.35
    out = tmp_path / "out"
    r = cli("convert", src, out, "--to", "hf", timeout=120)  # in-process it would never return
    assert_refused(r.returncode, r.stderr, out, "tf_model.h5", "did not finish in 1 s")
