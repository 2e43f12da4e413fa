"""MindSpore BERT family (runtime/mindspore/bert.py) against transformers and TensorFlow.

Real model: all-MiniLM-L6-v2 from its safetensors release and from the real TF checkpoint, checked
against transformers and against TensorFlow's own reference outputs, in PYNATIVE and GRAPH mode.
Breadth (DistilBERT, RoBERTa) on small random transformers models. `-s` prints the max |Δ|s.
"""

from __future__ import annotations

import json
import shutil
import warnings

import mindspore as ms
import numpy as np
import pytest
import torch
from ms_testing import maxdiff
from safetensors.torch import load_file, save_file

from slimport.errors import SlimportError
from slimport.runtime.mindspore.auto import AutoModel, AutoModelForSequenceClassification
from slimport.runtime.mindspore.bert import (
    BertForSequenceClassification,
    BertModel,
    RobertaForSequenceClassification,
    RobertaModel,
)
from slimport.runtime.mindspore.distilbert import (
    DistilBertForSequenceClassification,
    DistilBertModel,
)

ATOL = 1e-5
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------- MiniLM (real weights)
@pytest.fixture(scope="module")
def ref(minilm_tf):
    """TensorFlow's inputs and outputs for 4 sentences (reference_outputs.npz)."""
    return dict(np.load(minilm_tf / "reference_outputs.npz"))


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir, ref):
    from transformers import AutoModel as HFAutoModel

    model = HFAutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(ref[k]) for k in INPUTS}, output_hidden_states=True)


@pytest.fixture(scope="module")
def ms_minilm(minilm_dir, minilm_tf):
    return {
        "safetensors": BertModel.from_pretrained(minilm_dir, from_pt=True),
        "tf": BertModel.from_pretrained(minilm_tf, from_tf=True),
    }


def ms_inputs(ref) -> tuple:
    return tuple(ms.Tensor(ref[k]) for k in INPUTS)


@pytest.mark.parametrize("source", ["safetensors", "tf"])
def test_minilm_matches_transformers_and_tensorflow(ms_minilm, hf_minilm, ref, source, mode):
    model = ms_minilm[source]
    out = model(*ms_inputs(ref), output_hidden_states=True)
    assert list(out) == ["last_hidden_state", "pooler_output", "hidden_states"]
    d = {
        "last vs transformers": maxdiff(out.last_hidden_state, hf_minilm.last_hidden_state),
        "last vs tensorflow": maxdiff(out.last_hidden_state, ref["last_hidden_state"]),
        "pooler vs transformers": maxdiff(out.pooler_output, hf_minilm.pooler_output),
        "pooler vs tensorflow": maxdiff(out.pooler_output, ref["pooler_output"]),
    }
    assert len(out.hidden_states) == len(hf_minilm.hidden_states) == 7
    layers = [
        maxdiff(a, b) for a, b in zip(out.hidden_states, hf_minilm.hidden_states, strict=True)
    ]
    print(f"\nMiniLM from {source} [{mode}]: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    print("  per-layer hidden states max|Δ|: " + " ".join(f"{v:.1e}" for v in layers))
    assert max(d.values()) <= ATOL and max(layers) <= ATOL
    assert model.load_report.source_format == ("keras" if source == "tf" else "safetensors")
    plain = model(*ms_inputs(ref))  # default: no hidden states
    assert list(plain) == ["last_hidden_state", "pooler_output"]


def test_minilm_defaults_token_types_to_zero_and_works_without_mask(ms_minilm, ref):
    model = ms_minilm["safetensors"]
    ids = ms.Tensor(ref["input_ids"][:1, :8])  # the first sentence has no padding in 8 tokens
    full = model(ids, ms.Tensor(np.ones((1, 8), np.int64)), ms.Tensor(np.zeros((1, 8), np.int64)))
    assert np.array_equal(model(ids).last_hidden_state.asnumpy(), full.last_hidden_state.asnumpy())


def test_save_pretrained_reloads_bit_exact(ms_minilm, ref, tmp_path):
    model = ms_minilm["safetensors"]
    files = model.save_pretrained(tmp_path / "ms")
    assert sorted(files) == ["config.json", "model.ckpt"]
    again = BertModel.from_pretrained(tmp_path / "ms")
    assert again.load_report.source_format == "mindspore"
    a, b = model(*ms_inputs(ref)), again(*ms_inputs(ref))
    assert np.array_equal(a.last_hidden_state.asnumpy(), b.last_hidden_state.asnumpy())
    assert np.array_equal(a.pooler_output.asnumpy(), b.pooler_output.asnumpy())


def test_forced_layer_norm_eps_warns_with_measured_effect(minilm_dir):
    with pytest.warns(UserWarning, match="layer_norm_eps forced to 1e-07") as rec:
        model = BertModel.from_pretrained(minilm_dir, layer_norm_eps=1e-7)
    override = model.load_report.overrides["layer_norm_eps"]
    effect = override["effect_max_abs"]
    text = next(str(w.message) for w in rec if "layer_norm_eps" in str(w.message))
    print(f"\nlayer_norm_eps 1e-12 -> 1e-7 on MiniLM: last_hidden_state changes by {effect:.3g}")
    assert override["source"] == 1e-12 and override["forced"] == 1e-7
    assert f"{effect:.3g}" in text and effect > 0
    assert model.config["layer_norm_eps"] == 1e-7


# ---------------------------------------------------------------- classification head on MiniLM
def test_classifier_on_bare_minilm_is_newly_initialised_and_listed(minilm_dir, ref, tmp_path):
    with pytest.warns(UserWarning, match="newly initialised") as rec:
        model = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    assert any("classifier.weight" in str(w.message) for w in rec)
    notes = " ".join(model.load_report.notes)
    assert "newly initialised" in notes and "classifier.bias, classifier.weight" in notes
    w = model.classifier.weight.asnumpy()
    assert w.shape == (3, 384) and 0.01 < w.std() < 0.03  # normal(0, initializer_range=0.02)
    assert not model.classifier.bias.asnumpy().any()
    loaded = {t["target"] for t in model.load_report.tensors}
    assert (
        "bert.encoder.layer.5.output.dense.weight" in loaded and "classifier.weight" not in loaded
    )
    # the saved folder describes the head model: it reloads with the same (random) classifier
    model.save_pretrained(tmp_path / "cls")
    assert json.loads((tmp_path / "cls/config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is new any more
        again = BertForSequenceClassification.from_pretrained(tmp_path / "cls")
    x = ms_inputs(ref)
    assert np.array_equal(model(*x).logits.asnumpy(), again(*x).logits.asnumpy())


@pytest.fixture(scope="module")
def hf_classifier(minilm_dir, tmp_path_factory):
    """transformers' BertForSequenceClassification built on MiniLM (its own new classifier), saved."""
    from transformers import BertForSequenceClassification as HFCls

    torch.manual_seed(0)
    model = HFCls.from_pretrained(minilm_dir, num_labels=3).eval()
    folder = tmp_path_factory.mktemp("minilm_cls")
    model.save_pretrained(folder)
    return folder, model


def test_classifier_from_transformers_head_checkpoint_matches(hf_classifier, ref, mode):
    folder, hf = hf_classifier
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(model, BertForSequenceClassification)
    assert not any("newly" in n for n in model.load_report.notes)
    with torch.no_grad():
        expected = hf(**{k: torch.from_numpy(ref[k]) for k in INPUTS}).logits
    out = model(*ms_inputs(ref), output_hidden_states=True)
    d = maxdiff(out.logits, expected)
    print(f"\nMiniLM + classifier logits [{mode}]: max|Δ| {d:.2e}")
    assert d <= ATOL and len(out.hidden_states) == 7


def test_bare_model_from_head_checkpoint_drops_the_head(hf_classifier, ms_minilm, ref):
    with pytest.warns(UserWarning, match="does not use classifier.bias, classifier.weight"):
        model = BertModel.from_pretrained(hf_classifier[0])
    assert "classifier.weight" in model.load_report.ignored
    a = model(*ms_inputs(ref)).last_hidden_state.asnumpy()
    assert np.array_equal(a, ms_minilm["safetensors"](*ms_inputs(ref)).last_hidden_state.asnumpy())


# ---------------------------------------------------------------- small random models
def _save(model, folder):
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Small random transformers models (DistilBERT, RoBERTa, BERT) saved as safetensors."""
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("random_bert")
    small = dict(vocab_size=99, max_position_embeddings=64, initializer_range=0.2)
    distil = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **small)
    roberta = tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        type_vocab_size=1, pad_token_id=1, **small,
    )  # fmt: skip
    bert = tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **small
    )
    models = {
        "distilbert": tf.DistilBertModel(distil),
        "distilbert-cls": tf.DistilBertForSequenceClassification(distil),
        "roberta": tf.RobertaModel(roberta),
        "roberta-cls": tf.RobertaForSequenceClassification(roberta),
        "bert": tf.BertModel(bert),
        "gpt2": tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=1, n_head=4)
        ),
    }
    return {k: (_save(m, root / k), m) for k, m in models.items()}


def _padded_ids() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 99, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 1, 0  # RoBERTa's pad id is 1: positions skip the pads
    ids[2, 4:], mask[2, 4:] = 1, 0
    return ids, mask


@pytest.mark.parametrize(
    ("key", "cls", "output"),
    [
        ("distilbert", DistilBertModel, "last_hidden_state"),
        ("distilbert-cls", DistilBertForSequenceClassification, "logits"),
        ("roberta", RobertaModel, "last_hidden_state"),
        ("roberta-cls", RobertaForSequenceClassification, "logits"),
    ],
)
def test_random_models_match_transformers(random_models, key, cls, output):
    folder, hf = random_models[key]
    ids, mask = _padded_ids()
    with torch.no_grad():
        expected = hf(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
    model = cls.from_pretrained(folder)
    out = model(ms.Tensor(ids), ms.Tensor(mask), output_hidden_states=True)
    d = maxdiff(out[output], expected[output])
    layers = [maxdiff(a, b) for a, b in zip(out.hidden_states, expected.hidden_states, strict=True)]
    print(f"\n{key}: {output} max|Δ| {d:.2e}, hidden states {max(layers):.2e}")
    assert d <= ATOL and max(layers) <= ATOL
    assert not any("newly" in n for n in model.load_report.notes)
    if key == "roberta":
        assert maxdiff(out.pooler_output, expected.pooler_output) <= ATOL
        assert isinstance(AutoModel.from_pretrained(folder), RobertaModel)


def test_distilbert_classifier_graph_mode_and_round_trip(random_models, tmp_path):
    folder, hf = random_models["distilbert-cls"]
    ids, mask = _padded_ids()
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.save_pretrained(tmp_path / "ms")
    again = DistilBertForSequenceClassification.from_pretrained(tmp_path / "ms")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = model(ms.Tensor(ids), ms.Tensor(mask)).logits.asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    print(f"\ndistilbert-cls [graph]: logits max|Δ| {maxdiff(graph, expected):.2e}")
    assert maxdiff(graph, expected) <= ATOL
    a, b = model(ms.Tensor(ids), ms.Tensor(mask)), again(ms.Tensor(ids), ms.Tensor(mask))
    assert np.array_equal(a.logits.asnumpy(), b.logits.asnumpy())


# ---------------------------------------------------------------- bad input
def test_checkpoint_of_another_family_is_refused(random_models):
    with pytest.raises(SlimportError, match=r"a gpt2 checkpoint .* cannot load into BertModel"):
        BertModel.from_pretrained(random_models["gpt2"][0])
    with pytest.raises(SlimportError, match="cannot load into BertModel"):
        BertModel.from_pretrained(random_models["roberta"][0])


def test_shape_mismatch_names_the_tensors(random_models, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(random_models["bert"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        SlimportError, match=r"embeddings\.word_embeddings\.weight: checkpoint \[99, 32\]"
    ):
        BertModel.from_pretrained(folder)
    # the explicit opt-in re-initialises what does not fit (transformers' semantics), loudly
    with pytest.warns(
        UserWarning, match=r"re-initialised .*embeddings\.word_embeddings\.embedding_table"
    ):
        model = BertModel.from_pretrained(folder, ignore_mismatched_sizes=True)
    note = next(n for n in model.load_report.notes if n.startswith("re-initialised"))
    assert (
        "embeddings.word_embeddings.embedding_table: checkpoint [99, 32] vs model [99, 64]" in note
    )


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensor_is_an_error(random_models, tmp_path, change):
    folder = tmp_path / change
    shutil.copytree(random_models["bert"][0], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    if change == "missing":
        del tensors[name]
        match = rf"missing: {name}"
    else:
        tensors["encoder.layer.1.output.extra.weight"] = torch.zeros(2)
        match = r"match no rule .*encoder\.layer\.1\.output\.extra\.weight"
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(SlimportError, match=match):
        BertModel.from_pretrained(folder)
