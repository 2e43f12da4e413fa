"""The real TensorFlow all-MiniLM-L6-v2 checkpoint (tf_model.h5, saved by TFBertModel).

Ground truth is TensorFlow's own outputs stored beside it (reference_outputs.npz): a Keras file
converted to Hugging Face must reproduce them in PyTorch, Keras -> HF -> Keras must give back
the original h5 tensors bit for bit, and the safetensors release of the same model must be the
same tensors.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from slimport import api


@pytest.fixture(scope="module")
def tf_as_hf(minilm_tf, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_tf") / "hf"
    report = api.convert(minilm_tf, out, to="hf", progress=False)
    return out, report


def _h5_tensors(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
    return out


def test_tf_checkpoint_is_read_as_keras_bert_with_every_tensor(tf_as_hf):
    _, report = tf_as_hf
    assert (report["source_format"], report["source_dialect"], report["family"]) == (
        "keras",
        "keras",
        "bert",
    )
    assert report["tensor_count"] == 103 and report["ignored_source_tensors"] == []
    q = next(
        t for t in report["tensors"] if t["target"] == "encoder.layer.0.attention.self.query.weight"
    )
    assert q["sources"] == [
        "bert/tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0"
    ]
    assert q["ops"] == ["Transpose(0, 1)"]


def test_converted_model_reproduces_tensorflow_outputs(tf_as_hf, minilm_tf):
    from transformers import AutoModel

    ref = np.load(minilm_tf / "reference_outputs.npz")
    model = AutoModel.from_pretrained(tf_as_hf[0]).eval()
    inputs = {
        k: torch.from_numpy(ref[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    with torch.no_grad():
        out = model(**inputs)
    d_hidden = np.abs(out.last_hidden_state.numpy() - ref["last_hidden_state"]).max()
    d_pooled = np.abs(out.pooler_output.numpy() - ref["pooler_output"]).max()
    print(
        f"\nMiniLM TF -> HF vs TensorFlow: last_hidden_state max|d|={d_hidden:.3g}, pooler_output max|d|={d_pooled:.3g}"
    )
    assert d_hidden <= 1e-5 and d_pooled <= 1e-5


def test_keras_to_hf_to_keras_is_bit_exact(tf_as_hf, minilm_tf, tmp_path):
    api.convert(tf_as_hf[0], tmp_path / "keras", to="keras", progress=False)
    a, b = _h5_tensors(minilm_tf / "tf_model.h5"), _h5_tensors(tmp_path / "keras/tf_model.h5")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    with h5py.File(minilm_tf / "tf_model.h5") as f, h5py.File(tmp_path / "keras/tf_model.h5") as g:
        assert list(f.attrs["layer_names"]) == list(g.attrs["layer_names"]) == ["bert"]
        assert set(f["bert"].attrs["weight_names"]) == set(g["bert"].attrs["weight_names"])


def test_safetensors_release_and_tf_checkpoint_are_the_same_tensors(minilm_dir, minilm_tf):
    pt, tf = api.load(minilm_dir), api.load(minilm_tf)
    assert (pt.dialect, tf.dialect) == ("hf", "keras")
    assert pt.ignored == ["embeddings.position_ids"] and tf.ignored == []
    assert pt.hub.keys() == tf.hub.keys() and len(pt.hub) == 103
    worst = max((pt.hub[n].compute() - tf.hub[n].compute()).abs().max().item() for n in pt.hub)
    assert worst == 0.0


def test_safetensors_to_keras_equals_the_tf_file(minilm_dir, minilm_tf, tmp_path):
    api.convert(minilm_dir, tmp_path / "k", to="keras", progress=False)
    a, b = _h5_tensors(minilm_tf / "tf_model.h5"), _h5_tensors(tmp_path / "k/tf_model.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
