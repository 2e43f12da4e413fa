"""ONNX export: the exported graph computes what transformers (or our quantized torch model)
computes, the KV cache changes nothing, and bad input is refused clearly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from slimport.errors import SlimportError
from slimport.runtime.onnx import OnnxModel, export_onnx

TOL = 1e-4
SMALL = dict(initializer_range=0.1)  # larger random weights: structural bugs show up clearly


def _save(model, folder):
    model.eval().save_pretrained(folder)
    return folder


def tiny(kind: str, tmp_path):
    """A small random transformers model of `kind`, saved as an HF folder."""
    import transformers as tf

    torch.manual_seed(0)
    llama = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **SMALL)  # fmt: skip
    enc = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=64, **SMALL)  # fmt: skip
    make = {
        "llama-gqa-tied": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(**llama, tie_word_embeddings=True)
        ),
        "qwen2-bias": lambda: tf.Qwen2ForCausalLM(
            tf.Qwen2Config(**llama, tie_word_embeddings=False)
        ),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, **SMALL)
        ),
        "bert-cls": lambda: tf.BertForSequenceClassification(tf.BertConfig(**enc, num_labels=3)),
        "roberta-cls": lambda: tf.RobertaForSequenceClassification(
            tf.RobertaConfig(**enc, num_labels=2, pad_token_id=1)
        ),
        "distilbert": lambda: tf.DistilBertModel(
            tf.DistilBertConfig(
                vocab_size=99,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=37,
                max_position_embeddings=64,
                **SMALL,
            )  # fmt: skip
        ),
        "distilbert-cls": lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(
                vocab_size=99,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=37,
                max_position_embeddings=64,
                num_labels=4,
                **SMALL,
            )  # fmt: skip
        ),
    }
    return _save(make[kind](), tmp_path / kind)


def _reference(folder, ids, mask):
    """transformers' own output for the folder: logits, or an encoder's last hidden state."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    arch = AutoConfig.from_pretrained(folder).architectures[0]
    cls = (
        AutoModelForCausalLM if "CausalLM" in arch or "LMHead" in arch
        else AutoModelForSequenceClassification if "Classification" in arch
        else AutoModel
    )  # fmt: skip
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    feeds = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if cls is AutoModelForCausalLM:  # left padding: positions count real tokens, as generate does
        feeds["position_ids"] = torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))
    with torch.no_grad():
        out = model(**feeds)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _tokens(vocab: int, shape=(2, 7), seed=1):
    ids = np.random.default_rng(seed).integers(3, vocab, shape)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # the second row is left-padded
    return ids, mask


@pytest.mark.parametrize(
    "kind",
    [
        "llama-gqa-tied",
        "qwen2-bias",
        "gpt2",
        "bert-cls",
        "roberta-cls",
        "distilbert",
        "distilbert-cls",
    ],
)
def test_fp32_graph_matches_transformers(kind, tmp_path):
    src = tiny(kind, tmp_path)
    report = export_onnx(src, tmp_path / "onnx")
    ids, mask = _tokens(96)
    if report["kind"] == "encoder":  # encoders: padding at the end, as tokenizers pad them
        mask = mask[:, ::-1].copy()
    ours = OnnxModel(tmp_path / "onnx").logits(ids, mask)
    ref = _reference(src, ids, mask)
    valid = mask.astype(bool) if ours.ndim == 3 else slice(None)  # padded rows are garbage in both
    assert ours.shape == ref.shape
    assert np.abs(ours[valid] - ref[valid]).max() <= TOL
    assert np.abs(ref[valid]).max() > 100 * TOL  # the comparison is not between two near-zeros


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "gpt2"])
def test_incremental_decode_equals_full_recompute(kind, tmp_path):
    src = tiny(kind, tmp_path)
    export_onnx(src, tmp_path / "onnx")
    m = OnnxModel(tmp_path / "onnx")
    ids, mask = _tokens(96, (2, 9))
    full = m.logits(ids, mask)
    cache, steps = m.empty_cache(2), []
    for end in (5, 6, 7, 8, 9):  # a 5-token prompt, then one token a step
        start = 0 if end == 5 else end - 1
        logits, cache = m.step(ids[:, start:end], mask[:, :end], cache)
        steps.append(logits)
        assert cache["past_key_values.0.key"].shape[2] == end  # each step adds one position
    incremental = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    assert np.abs(incremental[valid] - full[valid]).max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "gpt2"])
def test_the_in_place_cache_computes_what_the_copied_cache_does(kind, tmp_path):
    """generate's cache (one buffer bound as past and present, appended in place) against
    step's (numpy in, numpy out): the same logits every step (to 1e-5, as incremental decode is
    held), left-padded rows included."""
    from slimport.runtime.onnx.session import InPlaceCache

    export_onnx(tiny(kind, tmp_path), tmp_path / "onnx")
    m = OnnxModel(tmp_path / "onnx")
    ids, mask = _tokens(96, (2, 9))
    in_place, cache = InPlaceCache(m, 2, capacity=12), m.empty_cache(2)
    for end in (5, 6, 7, 8, 9):
        start = 0 if end == 5 else end - 1
        copied, cache = m.step(ids[:, start:end], mask[:, :end], cache)
        assert np.abs(in_place.step(ids[:, start:end], mask[:, :end]) - copied).max() <= 1e-5
    assert m.generate(ids[:, :5], 4, attention_mask=mask[:, :5]).shape == (2, 9)


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "gpt2"])
def test_decoder_attention_is_one_fused_kernel_per_layer(kind, tmp_path):
    """GroupQueryAttention appends to the cache and attends (no per-layer Concat / Softmax),
    writing the presents itself; Llama: RoPE inside it (do_rotary), RMSNorm + residual fused;
    GPT-2: its packed c_attn output is GroupQueryAttention's packed query."""
    import onnx

    export_onnx(tiny(kind, tmp_path), tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx/model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    writers = {o: n.op_type for n in graph.node for o in n.output}
    assert {writers[f"present.{i}.{kv}"] for i in (0, 1) for kv in ("key", "value")} == {
        "GroupQueryAttention"
    }
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    rotary = {onnx.helper.get_attribute_value(a) for n in gqa for a in n.attribute if a.name == "do_rotary"}  # fmt: skip
    assert rotary == {int(kind != "gpt2")} and "RotaryEmbedding" not in ops
    inputs = {i.name for i in graph.input}
    assert ("position_ids" in inputs) == (kind == "gpt2")  # learned positions only
    if kind == "gpt2":
        assert all(n.input[1] == "" for n in gqa) and "Split" not in ops  # packed q|k|v
    if kind == "llama-gqa-tied":
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 2
        assert ops.count("SimplifiedLayerNormalization") == 1  # the first layer's input norm
        assert not {"ReduceMean", "Sqrt", "Transpose"} & set(ops)


def test_fp16_weights_compute_what_fp16_rounded_weights_do(tmp_path):
    """float16 stores half-size weights, computed in fp32: exactly the rounded model."""
    from transformers import AutoModelForCausalLM

    src = tiny("qwen2-bias", tmp_path)
    half = export_onnx(src, tmp_path / "onnx16", dtype="float16")
    assert half["weight_bytes"] < 0.6 * export_onnx(src, tmp_path / "onnx32")["weight_bytes"]
    rounded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    ids, mask = _tokens(96)
    with torch.no_grad():
        ref = rounded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = OnnxModel(tmp_path / "onnx16").logits(ids, mask)
    v = mask.astype(bool)
    assert np.abs(ours[v] - ref[v]).max() <= TOL


# ---------------------------------------------------------------- quantized (MatMulNBits)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return tiny("llama-gqa-tied", tmp_path_factory.mktemp("tl"))


@pytest.mark.parametrize(
    "options",
    [
        dict(bits=4, group_size=32, symmetric=False),
        dict(bits=4, group_size=64, symmetric=False),
        dict(bits=4, group_size=32, symmetric=True),
        dict(bits=4, group_size=64, symmetric=True),
        dict(bits=8),  # per-channel: one scale per row, repeated over MatMulNBits blocks
        dict(bits=4, group_size=32, symmetric=False, protect=[]),  # the (untied) head too
        # recipes/w4-awq-gptq-onnx.yaml's layout: head and MLPs at g64, attention at g32
        dict(bits=4, group_size=32, symmetric=False, protect=[], weight_observer="mse",
             overrides={"lm_head": {"group_size": 64}, r"mlp\.": {"group_size": 64}}),
    ],
    ids=lambda o: "w{bits}-g{group_size}-{sym}{head}{mixed}".format(
        bits=o["bits"],
        group_size=o.get("group_size", "ch"),
        sym="sym" if o.get("symmetric", True) else "asym",
        head="-head" if "protect" in o else "",
        mixed="-mlp-g64" if "overrides" in o else "",
    ),
)  # fmt: skip
def test_quantized_folder_exports_its_integers(options, tiny_llama_dir, tmp_path):
    from slimport import load_quantized
    from slimport.compress import api

    qdir = tmp_path / "q"
    api.quantize(tiny_llama_dir, qdir, progress=False, **options)
    report = export_onnx(qdir, tmp_path / "onnx", accuracy_level=0)
    head = "protect" in options  # the recipe quantized lm_head as well
    assert report["quantized_linears"] == 2 * 7 + head  # q k v o gate up down per layer
    model, _ = load_quantized(qdir)  # fp32 compute: the dequantized reference, per-module schemes
    ids, mask = _tokens(96)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = OnnxModel(tmp_path / "onnx").logits(ids, mask)
    v = mask.astype(bool)
    assert np.abs(ours[v] - ref[v]).max() <= TOL
    import onnx

    proto = onnx.load(str(tmp_path / "onnx/model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    # per layer: q/k/v as one packed MatMulNBits, o, gate/up packed, down; the tied head float
    assert ops.count("MatMulNBits") == 2 * 4 + head and ("FusedMatMul" in ops) != head
    names = {t.name for t in proto.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    blocks = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}  # fmt: skip
    if "group_size" in options:  # block_size is the folder's group size, per Linear
        assert blocks == ({32, 64} if "overrides" in options else {options["group_size"]})
    assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in names) == (
        not options.get("symmetric", True)
    )


def test_quantized_encoder_pads_channel_blocks_exactly(tmp_path):
    """W8 per-channel BERT: 37 input features fill one 64-wide block, padded with zero points."""
    from slimport.compress import api
    from slimport.compress.quant.compressed import load_simulated

    src = tiny("bert-cls", tmp_path)
    api.quantize(src, tmp_path / "q", progress=False, bits=8, symmetric=False)
    report = export_onnx(tmp_path / "q", tmp_path / "onnx", accuracy_level=0)
    assert report["quantized_linears"] > 0
    model, _ = load_simulated(tmp_path / "q")
    ids, mask = _tokens(96)
    mask = mask[:, ::-1].copy()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = OnnxModel(tmp_path / "onnx").logits(ids, mask)
    assert np.abs(ours - ref).max() <= TOL


def test_unsupported_schemes_are_refused(tiny_llama_dir, tmp_path):
    from slimport.compress import api

    api.quantize(tiny_llama_dir, tmp_path / "w4a8", progress=False, bits=4, group_size=32,
                 activations="dynamic")  # fmt: skip
    with pytest.raises(
        SlimportError, match="W4A8 dynamic group weights with quantized activations"
    ):
        export_onnx(tmp_path / "w4a8", tmp_path / "o1")
    api.quantize(tiny_llama_dir, tmp_path / "w3", progress=False, bits=4, group_size=32)
    config = json.loads((tmp_path / "w3/config.json").read_text())  # relabelled as 3-bit
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (tmp_path / "w3/config.json").write_text(json.dumps(config))
    (tmp_path / "w3/slimport_quantization.json").unlink()
    with pytest.raises(SlimportError, match="W3 weights: .*MatMulNBits runs 4-bit or 8-bit"):
        export_onnx(tmp_path / "w3", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- folder, errors


def test_large_models_write_external_data(tmp_path, monkeypatch):
    from slimport.runtime.onnx import export

    monkeypatch.setattr(export, "EXTERNAL_ABOVE", 0)
    src = tiny("gpt2", tmp_path)
    report = export_onnx(src, tmp_path / "onnx")
    assert report["external_data"] and (tmp_path / "onnx/model.onnx.data").is_file()
    ids, mask = _tokens(96)
    ref = _reference(src, ids, mask)
    v = mask.astype(bool)
    assert np.abs(OnnxModel(tmp_path / "onnx").logits(ids, mask)[v] - ref[v]).max() <= TOL


def test_bad_input_is_refused_clearly(tmp_path, monkeypatch):
    from slimport.runtime.onnx import export

    src = tiny("llama-gqa-tied", tmp_path)
    with pytest.raises(SlimportError, match="unknown ONNX dtype 'bfloat16'"):
        export_onnx(src, tmp_path / "o", dtype="bfloat16")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_fast"}))
    with pytest.raises(SlimportError, match="hidden_act='gelu_fast'"):
        export_onnx(src, tmp_path / "o")
    monkeypatch.delitem(export.BUILDERS, "llama")
    with pytest.raises(SlimportError, match="no ONNX graph builder for llama models"):
        export_onnx(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2(smollm2_hf, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smol") / "onnx"
    report = export_onnx(smollm2_hf, out)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    ids = tok("The capital of France is", return_tensors="np")["input_ids"]
    return SimpleNamespace(onnx=OnnxModel(out), hf=hf, ids=ids, folder=out, report=report)


def test_smollm2_folder_has_config_tokenizer_and_genai_config(smollm2):
    assert {"model.onnx", "config.json", "tokenizer.json", "genai_config.json"} <= set(
        smollm2.report["files"]
    )
    genai = json.loads((smollm2.folder / "genai_config.json").read_text())
    d = genai["model"]["decoder"]
    assert (d["num_key_value_heads"], d["num_attention_heads"], d["head_size"]) == (3, 9, 64)
    assert genai["search"]["past_present_share_buffer"] is True  # GQA appends in place


def test_smollm2_logits_match_transformers(smollm2):
    with torch.no_grad():
        ref = smollm2.hf(torch.tensor(smollm2.ids)).logits.numpy()
    assert np.abs(smollm2.onnx.logits(smollm2.ids) - ref).max() <= TOL


def _greedy(smollm2, n):
    """Ours (KV cache) and transformers' greedy tokens (argmax of a full forward each step:
    the reference shares no cache code with either runtime)."""
    ref = torch.tensor(smollm2.ids)
    with torch.no_grad():
        for _ in range(n):
            ref = torch.cat([ref, smollm2.hf(ref).logits[:, -1:].argmax(-1)], dim=1)
    return smollm2.onnx.generate(smollm2.ids, n).tolist(), ref.tolist()


def test_smollm2_greedy_tokens_match_transformers(smollm2):
    ours, ref = _greedy(smollm2, 4)
    assert ours == ref


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_match_transformers(smollm2):
    ours, ref = _greedy(smollm2, 64)
    assert ours == ref


def test_onnxruntime_genai_runs_the_folder_with_the_same_greedy_tokens(smollm2):
    pytest.importorskip("onnxruntime_genai")
    from onnx_testing import genai_greedy

    ids = smollm2.ids[0].tolist()
    theirs = genai_greedy(smollm2.folder, ids, 24)  # in genai's one shared cache buffer
    assert theirs == smollm2.onnx.generate(smollm2.ids, 24)[0, len(ids) :].tolist()


def test_minilm_hidden_states_match_transformers(minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    export_onnx(minilm_dir, tmp_path / "onnx")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["A short sentence.", "Another, somewhat longer sentence to pad the first."],
                padding=True, return_tensors="np")  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = OnnxModel(tmp_path / "onnx").logits(ids, mask)
    ref = _reference(minilm_dir, ids, mask)
    v = mask.astype(bool)
    assert np.abs(ours[v] - ref[v]).max() <= TOL
