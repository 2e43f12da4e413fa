"""optimum's ONNX exports (tests/onnx_fixtures, written by make_optimum.py with optimum 2.1.0)
convert to Hugging Face models that compute what ONNX Runtime computes on the original file:
the folder as optimum writes it (config.json beside model.onnx) and the model.onnx alone.

optimum names nodes like the TorchScript exporter (`/model/layers.0/self_attn/q_proj/MatMul`),
keeps anonymous `[in, out]` MatMul weights, drops what its outputs do not use (BERT's pooler,
which its config.json's BertModel has) and gives the decoder past_key_values inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slimport import api

ort = pytest.importorskip("onnxruntime")
FIXTURES = Path(__file__).parent / "onnx_fixtures"
TOL = 1e-5
IDS = np.array([[5, 17, 3, 42, 8, 11, 29, 2, 60]], dtype=np.int64)
AUTO = {"bert": "BertModel", "llama": "AutoModelForCausalLM"}
CONFIG_KEYS = {
    "bert": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act"),
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "hidden_act"),
}  # fmt: skip


def _ort(path: Path) -> np.ndarray:
    """The first output for IDS, every other input as optimum's own runtime feeds a first step:
    no token types, positions 0..n-1, an empty KV cache."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    given = {"input_ids": IDS, "attention_mask": np.ones_like(IDS),
             "token_type_ids": np.zeros_like(IDS), "position_ids": np.arange(IDS.shape[1])[None]}  # fmt: skip
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):  # [batch, kv_heads, past 0, head_dim]
            shape = [d if isinstance(d, int) else 1 if "batch" in d else 0 for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        else:
            feeds[i.name] = given[i.name]
    return sess.run(None, feeds)[0]


def _hf(folder: Path, auto: str) -> np.ndarray:
    import transformers as tf

    model = getattr(tf, auto).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(IDS), attention_mask=torch.ones(IDS.shape))
    return out[0].numpy()


@pytest.mark.parametrize("layout", ["optimum-folder", "model.onnx-alone"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_optimum_export_converts_to_what_onnx_runtime_computes(kind, layout, tmp_path):
    folder = FIXTURES / f"optimum-{kind}"
    src = folder
    if layout == "model.onnx-alone":
        src = tmp_path / "alone" / "model.onnx"
        src.parent.mkdir()
        shutil.copy(folder / "model.onnx", src)
    out = tmp_path / "hf"
    report = api.convert(src, out, to="hf", progress=False)
    delta = float(np.abs(_hf(out, AUTO[kind]) - _ort(folder / "model.onnx")).max())
    print(f"optimum {kind} ({layout}): max |d| vs ONNX Runtime {delta:.2e}")
    assert delta <= TOL
    assert report["source_format"] == "onnx"
    assert any("named after the modules" in n for n in report["notes"])
    written = json.loads((out / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    for key in CONFIG_KEYS[kind]:  # read off the graph alone, or kept from optimum's config.json
        assert written[key] == original[key], key
    if kind == "bert":  # the graph has no pooler: the class it computes is the pooler-less one
        assert "pooler.dense.weight" not in {t["target"] for t in report["tensors"]}
        assert written["add_pooling_layer"] is False
        if layout == "optimum-folder":
            assert any("add_pooling_layer=False" in n for n in report["notes"])
