"""ONNX files as `torch.onnx.export` writes them (anonymous [in, out] MatMul weights, no
config.json) convert to Hugging Face models that compute what ONNX Runtime computes on the
original file; `inspect` names the family and the config read off the graph."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from slimport import api

ort = pytest.importorskip("onnxruntime")
TOL = 1e-5
EXPORTERS = ("torchscript", "dynamo")
IDS = np.array([[5, 17, 3, 42, 8, 11, 29, 2, 64]], dtype=np.int64)


def _tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    llama = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)  # fmt: skip
    if kind == "llama":  # norms stay at ones: the exporters store them once (deduplicated)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama))
    if kind == "gpt2":  # fused qkv (Conv1D c_attn, [in, out] by design), tied lm_head
        gpt2 = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**gpt2))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama))
    with torch.no_grad():  # distinct biases and norms, so a swapped name changes the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _exported(name: str, make, exporter: str):
    """`make()`'s model exported, kept in $SLIMPORT_CACHE (the dynamo exporter takes half a
    minute a model); the key holds the torch and transformers versions that wrote it."""
    import transformers

    from slimport.finetune import cache_root

    key = f"{name}-{exporter}-torch{torch.__version__}-tf{transformers.__version__}"
    folder = cache_root() / "onnx-exports" / key
    if not (folder / "model.onnx").exists():
        tmp = folder.with_name(f".{key}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _export(make(), tmp / "model.onnx", exporter)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder / "model.onnx"


def _export(model, path, exporter: str) -> None:
    """Export like users do: input_ids and attention_mask with dynamic batch and length."""
    cls = type(model)

    class Exported(cls):  # same module tree (names), a plain forward for the exporters
        def forward(self, input_ids, attention_mask):
            return cls.forward(self, input_ids=input_ids, attention_mask=attention_mask)[0]

    model.eval().__class__ = Exported
    ids = torch.from_numpy(IDS)
    args = (ids, torch.ones_like(ids))
    names = ["input_ids", "attention_mask"]
    if exporter == "dynamo":
        dims = {0: "batch", 1: "sequence"}
        torch.onnx.export(model, args, path, input_names=names, dynamo=True,
                          dynamic_shapes=(dims, dims), verbose=False)  # fmt: skip
    else:
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        torch.onnx.export(model, args, path, input_names=names, dynamo=False, dynamic_axes=axes)
    model.__class__ = cls
    assert not (path.parent / "config.json").exists()


def _ort(path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})[0]


def _hf(folder, auto: str) -> np.ndarray:
    import transformers as tf

    model = getattr(tf, auto).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(IDS), attention_mask=torch.ones(IDS.shape))
    return out[0].numpy()


def _roundtrip(path, tmp_path, auto: str) -> tuple[float, dict, dict]:
    out = tmp_path / "hf"
    report = api.convert(path, out, to="hf", progress=False)
    delta = float(np.abs(_hf(out, auto) - _ort(path)).max())
    return delta, report, json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module", params=EXPORTERS)
def minilm_onnx(request, minilm_dir):
    from transformers import BertModel

    def make():  # as sentence-transformers exports it: the encoder, no pooler
        return BertModel.from_pretrained(minilm_dir, add_pooling_layer=False)

    return _exported("minilm", make, request.param)


def test_minilm_export_converts_without_config(minilm_onnx, tmp_path):
    delta, report, config = _roundtrip(minilm_onnx, tmp_path, "BertModel")
    print(f"{minilm_onnx.parent.name}: last_hidden_state max |d| vs ORT {delta:.2e}")
    assert delta <= TOL
    assert report["family"] == "bert" and report["source_format"] == "onnx"
    assert any("named after the modules" in n for n in report["notes"])
    assert any("config inferred from the ONNX graph" in n for n in report["notes"])
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size", "max_position_embeddings",
                                   "layer_norm_eps", "hidden_act")} == {
        "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    }  # fmt: skip


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_export_converts_without_config(kind, exporter, tmp_path):
    path = _exported(kind, lambda: _tiny(kind), exporter)
    source = _tiny(kind)
    delta, report, config = _roundtrip(path, tmp_path, "AutoModelForCausalLM")
    print(f"{kind} {exporter}: logits max |d| vs ORT {delta:.2e}")
    assert delta <= TOL
    assert report["family"] == "llama" and config["model_type"] == kind
    want = source.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "hidden_act"):  # fmt: skip
        assert config[key] == getattr(want, key), key
    assert config["rope_theta"] == 5000.0
    assert config["tie_word_embeddings"] is False  # a trained lm_head is no copy of the table


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gpt2_fused_qkv_export_converts_without_config(exporter, tmp_path):
    path = _exported("gpt2", lambda: _tiny("gpt2"), exporter)
    delta, report, config = _roundtrip(path, tmp_path, "AutoModelForCausalLM")
    print(f"gpt2 {exporter}: logits max |d| vs ORT {delta:.2e}")
    assert delta <= TOL
    assert report["family"] == "gpt2"
    # heads seen through the Split of the fused projection; the exporter's anonymous lm_head is
    # the embedding transposed, bit for bit: tied again, not kept as a copy
    assert "lm_head.weight is the embedding transposed: tied" in report["notes"]
    assert config.get("tie_word_embeddings", True) is True
    assert "lm_head.weight" not in {t["target"] for t in report["tensors"]}
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"]) == (
        32, 2, 4, 64)  # fmt: skip
    assert config["activation_function"] == "gelu_new"


def test_inspect_names_family_and_config(minilm_onnx, capsys):
    from slimport.cli import main

    assert main(["inspect", str(minilm_onnx)]) == 0
    out = capsys.readouterr().out
    assert "family" in out and " bert" in out
    assert "config.hidden_size" in out and "384" in out
    assert "config.num_attention_heads" in out


def test_explicit_config_overrides_the_graph(minilm_onnx, minilm_dir, tmp_path):
    cfg = json.loads((minilm_dir / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5  # a value the graph does not show: it must win
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    info = api.inspect(minilm_onnx, config=tmp_path / "config.json")
    assert info["family"] == "bert" and info["config"]["layer_norm_eps"] == 1e-5


def test_config_beside_the_file_wins(minilm_onnx, minilm_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(minilm_onnx.parent, folder)  # the dynamo exporter writes model.onnx.data
    cfg = json.loads((minilm_dir / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-7
    (folder / "config.json").write_text(json.dumps(cfg))
    assert api.inspect(folder)["config"]["layer_norm_eps"] == 1e-7


def test_classifier_with_pooler_from_an_old_opset(tmp_path):
    """Opset 14: LayerNorm decomposed (ReduceMean, Sub, Pow, Sqrt, Div) and GELU as Erf; the
    pooler and the classifier head are recovered with the encoder."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=3,
                        layer_norm_eps=1e-7)  # fmt: skip
    model = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    ids = torch.from_numpy(IDS)
    cls = type(model)

    class Exported(cls):
        def forward(self, input_ids, attention_mask):
            return cls.forward(self, input_ids=input_ids, attention_mask=attention_mask)[0]

    model.__class__ = Exported
    torch.onnx.export(model, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=14,
                      input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": {1: "s"}, "attention_mask": {1: "s"}})  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" not in ops and "Erf" in ops
    delta, report, config = _roundtrip(path, tmp_path, "BertForSequenceClassification")
    print(f"bert-cls opset 14: logits max |d| vs ORT {delta:.2e}")
    assert delta <= TOL
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["layer_norm_eps"] == 1e-7 and config["hidden_act"] == "gelu"
    assert config["num_labels"] == 3  # read off the classifier shape


def test_graph_without_module_scopes_is_refused_clearly(tmp_path):
    """Node names and scopes stripped (a graph simplifier's output): the roles are unknown, so
    nothing is guessed; the user is told to pass the config."""
    from slimport.errors import SlimportError

    model = onnx.load(str(_exported("llama", lambda: _tiny("llama"), "torchscript")))
    for n in model.graph.node:
        n.name = ""
        del n.metadata_props[:]
    onnx.save(model, str(tmp_path / "model.onnx"))
    info = api.inspect(tmp_path / "model.onnx")
    assert info["family"] is None and "no model config found" in info["architecture_error"]
    with pytest.raises(SlimportError, match="--config"):
        api.convert(tmp_path / "model.onnx", tmp_path / "out", to="hf", progress=False)
    assert not (tmp_path / "out").exists()


def _split_as_slices(src, dst) -> int:
    """`src` with every Split rewritten as one Slice of the split axis per output, the way
    `qkv[..., :h]` indexing of a fused projection exports. Returns how many Splits it rewrote."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    nodes, rewritten = [], 0
    for n in model.graph.node:
        if n.op_type != "Split":
            nodes.append(n)
            continue
        axis = next(a.i for a in n.attribute if a.name == "axis")
        sizes = numpy_helper.to_array(consts[n.input[1]].attribute[0].t).tolist()
        for k, out in enumerate(n.output):
            bounds = {"starts": sum(sizes[:k]), "ends": sum(sizes[: k + 1]), "axes": axis}
            names = [f"{n.name}/{key}_{k}" for key in bounds]
            for name, value in zip(names, bounds.values(), strict=True):
                nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
                    np.array([value], dtype=np.int64))))  # fmt: skip
            nodes.append(
                helper.make_node("Slice", [n.input[0], *names], [out], name=f"{n.name}_{k}")
            )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return rewritten


def test_fused_qkv_read_through_slices(tmp_path):
    """A fused QKV projection cut with Slices instead of a Split: heads are still read off the
    Reshapes behind them, and the model converts to what ONNX Runtime computes."""
    src = _exported("gpt2", lambda: _tiny("gpt2"), "torchscript")
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    assert _split_as_slices(src, path) == 2  # one per block
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Split" not in ops
    assert np.array_equal(_ort(path), _ort(src))  # the rewrite computes the same
    delta, report, config = _roundtrip(path, tmp_path, "AutoModelForCausalLM")
    print(f"gpt2 qkv via Slice: logits max |d| vs ORT {delta:.2e}")
    assert delta <= TOL
    assert report["family"] == "gpt2" and config["n_head"] == 4
