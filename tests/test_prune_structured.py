"""Structured pruning: removing heads / FFN channels gives a physically smaller model that
computes exactly what the original computes with those units' outputs zeroed (logits equal to
1e-5), whose folder loads in plain transformers (BERT's heads: as transformers 4's
`pruned_heads`, which slimport reads under transformers 5); GQA stays consistent; bad options
are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from slimport.cli import main
from slimport.compress.prune import structured
from slimport.errors import SlimportError
from slimport.io import pruned_heads

TOL = 1e-5
H, G, D, FFN = 6, 2, 8, 48  # query heads, KV heads (3 per group), head size, FFN channels


def _llama(**over) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=48, intermediate_size=FFN, num_hidden_layers=3,
               num_attention_heads=H, num_key_value_heads=G, head_dim=D, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **over})).eval()


def _bert(cls=BertModel):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=FFN, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32)  # fmt: skip
    return cls(cfg).eval()


def _masked(model, p: structured.Plan, layout: structured.StructLayout):
    """The original with the removed units' outputs zeroed: their columns of o / down."""
    masked = copy.deepcopy(model)
    d = structured.head_shape(model.config)[2] if p.structure == "heads" else 1
    n = (
        model.config.num_attention_heads
        if p.structure == "heads"
        else model.config.intermediate_size
    )
    for block, keep in zip(structured.blocks(masked, layout), p.keep, strict=True):
        out = block.get_submodule(layout.o if p.structure == "heads" else layout.down)
        with torch.no_grad():
            for u in set(range(n)) - set(keep):
                out.weight[:, u * d : (u + 1) * d] = 0
    return masked


@torch.no_grad()
def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("structure", "unit", "sizes"),
    [
        ("heads", "head", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": D}),
        ("heads", "group", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": D}),
        ("ffn", "head", {"intermediate_size": 32}),
    ],
)
def test_llama_pruning_equals_the_masked_original(structure, unit, sizes):
    model = _llama()
    p = structured.plan(model, structure, 0.33, unit)
    small = structured.shrink(model, p)
    assert p.sizes == sizes
    for k, v in sizes.items():
        assert getattr(small.config, k) == v
    attn, mlp = small.model.layers[0].self_attn, small.model.layers[0].mlp
    h, g = small.config.num_attention_heads, small.config.num_key_value_heads
    assert attn.q_proj.weight.shape == (h * D, 48) and attn.k_proj.weight.shape == (g * D, 48)
    assert attn.o_proj.weight.shape == (48, h * D)
    assert mlp.down_proj.weight.shape == (48, small.config.intermediate_size)
    assert structured.parameters(small) < structured.parameters(model)
    if structure == "heads":  # GQA: every kept query head's KV group was kept too
        for heads, kv in zip(p.keep, p.keep_kv, strict=True):
            assert {q // (H // G) for q in heads} == set(kv)
    torch.testing.assert_close(_out(small, IDS), _out(_masked(model, p, structured.LLAMA), IDS),
                               atol=TOL, rtol=0)  # fmt: skip


def test_bert_ffn_pruning_equals_the_masked_original():
    model = _bert()
    p = structured.plan(model, "ffn", 0.5)
    small = structured.shrink(model, p)
    assert small.encoder.layer[0].intermediate.dense.weight.shape == (24, 32)
    torch.testing.assert_close(_out(small, IDS), _out(_masked(model, p, structured.BERT), IDS),
                               atol=TOL, rtol=0)  # fmt: skip


def test_bert_head_pruning_equals_the_masked_original_and_lists_the_removed_heads():
    model = _bert(BertForSequenceClassification)
    p = structured.plan(model, "heads", 0.5)
    small = structured.shrink(model, p)
    removed = small.config.pruned_heads  # transformers 4's format: the count stays, heads listed
    assert small.config.num_attention_heads == 4
    assert {k: len(v) for k, v in removed.items()} == {"0": 2, "1": 2}
    for i, (layer, keep) in enumerate(zip(small.bert.encoder.layer, p.keep, strict=True)):
        assert sorted(keep + removed[str(i)]) == [0, 1, 2, 3]
        assert layer.attention.self.query.weight.shape == (2 * 8, 32)
        assert layer.attention.output.dense.weight.shape == (32, 2 * 8)
    torch.testing.assert_close(_out(small, IDS), _out(_masked(model, p, structured.BERT), IDS),
                               atol=TOL, rtol=0)  # fmt: skip
    with pytest.raises(SlimportError, match="pruned already"):  # heads go once, from the original
        structured.plan(small, "heads", 0.3)


def test_the_least_important_units_go_first():
    model = _llama()
    with torch.no_grad():  # channel 5 and head 4 of layer 1 contribute nothing
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, 4 * D : 5 * D] = 0
    norms = [torch.ones(FFN) for _ in range(3)]
    for sq in (None, norms):
        assert 5 not in structured.plan(model, "ffn", 0.1, sqnorms=sq).keep[1]
    assert 4 not in structured.plan(model, "heads", 0.33).keep[1]
    # Wanda: a channel that never fires on the calibration text goes first too
    norms[2][7] = 0.0
    assert 7 not in structured.plan(model, "ffn", 0.1, sqnorms=norms).keep[2]


def test_activation_norms_are_the_output_projections_input_norms():
    model = _llama()
    seen = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, FFN))
    )
    sq = structured.activation_norms(model, [{"input_ids": IDS}], structured.LLAMA, "ffn")
    hook.remove()
    torch.testing.assert_close(sq[2], torch.cat(seen).square().sum(0))


def test_activation_norms_leave_padding_out():
    model = _bert()
    a, b = IDS[0, :5], IDS[1, :9]
    padded = {"input_ids": torch.stack([torch.cat([a, torch.zeros(4, dtype=a.dtype)]), b]),
              "attention_mask": torch.tensor([[1] * 5 + [0] * 4, [1] * 9])}  # fmt: skip
    alone = [{"input_ids": a[None]}, {"input_ids": b[None]}]
    for structure in ("heads", "ffn"):
        got = structured.activation_norms(model, [padded], structured.BERT, structure)
        want = structured.activation_norms(model, alone, structured.BERT, structure)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_pruned_folder_loads_in_plain_transformers(tmp_path):
    src = tmp_path / "src"
    model = _llama()
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(str(i) for i in range(300)))  # unused by magnitude
    out = tmp_path / "small"
    report = structured.prune_structured(src, out, "heads", 0.33, method="magnitude")
    assert report["sizes_after"]["num_attention_heads"] == 4
    assert (out / "tokenizer_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_attention_heads == 4 and loaded.config.num_key_value_heads == 2
    expect = structured.shrink(model, structured.plan(model, "heads", 0.33))
    torch.testing.assert_close(_out(loaded, IDS), _out(expect, IDS), atol=TOL, rtol=0)
    assert json.loads((out / structured.REPORT).read_text())["parameters_after"] == (
        structured.parameters(loaded)
    )


def test_minilm_heads_then_ffn_folder_loads_and_equals_the_masked_original(minilm_dir, tmp_path):
    heads, out = tmp_path / "heads", tmp_path / "both"
    report = structured.prune_structured(minilm_dir, heads, "heads", 0.3, method="magnitude")
    structured.prune_structured(heads, out, "ffn", 0.3, method="magnitude")
    assert "4 heads removed from each of 6 layers" in structured.summary(report)
    config = json.loads((out / "config.json").read_text())
    assert {len(v) for v in config["pruned_heads"].values()} == {4}  # 12 -> 8, every layer
    assert config["intermediate_size"] == 1075
    small = pruned_heads.from_pretrained(AutoModel, out, dtype=torch.float32)
    layer = small.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 8
    assert layer.attention.self.key.weight.shape == (256, 384)
    # what it computes: the original with the removed heads' and channels' outputs zeroed
    original = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    masked = _masked(original, structured.Plan("heads", report["kept"]), structured.BERT)
    ffn = json.loads((out / structured.REPORT).read_text())["kept"]
    masked = _masked(masked, structured.Plan("ffn", ffn), structured.BERT)
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_out(small, ids), _out(masked, ids), atol=TOL, rtol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers 5 alone
        AutoModel.from_pretrained(out)  # refuses (never loads half a model)


def test_a_pruned_heads_config_that_does_not_fit_is_refused(tmp_path):
    model = _bert()
    model.config.pruned_heads = {"0": [0, 1, 2, 3]}  # every head of layer 0
    model.save_pretrained(tmp_path / "all")
    with pytest.raises(SlimportError, match="at least one head must stay"):
        pruned_heads.from_pretrained(AutoModel, tmp_path / "all")
    model.config.pruned_heads = {"0": [1]}  # full-size weights under a pruned config
    model.save_pretrained(tmp_path / "full")
    with pytest.raises(SlimportError, match="do not fit the pruned-heads config"):
        pruned_heads.from_pretrained(AutoModel, tmp_path / "full")


def test_minilm_ffn_pruning_loads_in_transformers_and_equals_the_masked_original(
    minilm_dir, tmp_path
):
    out = tmp_path / "minilm-ffn"
    report = structured.prune_structured(minilm_dir, out, "ffn", 0.3, method="magnitude")
    small = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    assert small.config.intermediate_size == 1536 - round(1536 * 0.3)
    assert report["parameters_after"] < report["parameters_before"]
    p = structured.Plan("ffn", report["kept"])
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_out(small, ids), _out(_masked(original, p, structured.BERT), ids),
                               atol=TOL, rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        (_llama, ("ffn", 0.0), r"must be in \(0, 1\)"),
        (_llama, ("ffn", 1.0), r"must be in \(0, 1\)"),
        (_llama, ("ffn", -0.2), r"must be in \(0, 1\)"),
        (_llama, ("layers", 0.3), "unknown --structured"),
        (_llama, ("heads", 0.9, "group"), "removes all 2 KV groups"),
        (_llama, ("heads", 0.1), "removes none of the 3 query heads per KV group"),
        (
            lambda: _llama(num_attention_heads=4, num_key_value_heads=4),
            ("heads", 0.99),
            "removes all 4",
        ),
        (_bert, ("heads", 0.9), "removes all 4 heads of every layer"),
        (
            lambda: _llama(
                hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=10
            ),
            ("heads", 0.25),
            "leaves 3 attention heads, which do not divide hidden_size 40",
        ),
    ],
)
def test_bad_structured_options_are_refused(model, args, message):
    with pytest.raises(SlimportError, match=message):
        structured.plan(model(), *args)


def test_inconsistent_gqa_config_is_refused():
    model = _llama()
    model.config.num_key_value_heads = 4  # 6 query heads cannot form 4 groups
    with pytest.raises(SlimportError, match="not a multiple of num_key_value_heads"):
        structured.plan(model, "heads", 0.3)


def test_cli_structured_refuses_unstructured_options(tmp_path, capsys):
    src = tmp_path / "src"
    _llama().save_pretrained(src)
    assert main(["prune", str(src), str(tmp_path / "a"), "--structured", "heads", "--ratio", "0.3",
                 "--bits", "4"]) != 0  # fmt: skip
    assert "takes --ratio, not --bits" in capsys.readouterr().err
    assert main(["prune", str(src), str(tmp_path / "b"), "--structured", "ffn"]) != 0
    assert "needs --ratio" in capsys.readouterr().err
    assert main(["prune", str(src), str(tmp_path / "c"), "--ratio", "0.3"]) != 0
    assert "go with --structured" in capsys.readouterr().err
    assert main(["prune", str(src), str(tmp_path / "d"), "--structured", "ffn", "--ratio", "0.25",
                 "--method", "magnitude"]) == 0  # fmt: skip
    assert "intermediate_size 48 -> 36" in capsys.readouterr().out


def test_pruned_llama_runs_in_the_mindspore_runtime(tmp_path):
    ms = pytest.importorskip("mindspore")
    from slimport.runtime.mindspore.auto import AutoModelForCausalLM as MSAutoModel

    src, heads, out = tmp_path / "src", tmp_path / "heads", tmp_path / "small"
    _llama().save_pretrained(src)
    structured.prune_structured(src, heads, "heads", 0.33, method="magnitude")
    structured.prune_structured(heads, out, "ffn", 0.33, method="magnitude")
    ref = _out(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), IDS)
    logits = MSAutoModel.from_pretrained(out)(ms.Tensor(IDS.numpy().astype("int32"))).logits
    assert float((torch.from_numpy(logits.asnumpy()) - ref).abs().max()) <= 1e-4


def test_a_head_pruned_bert_quantizes_and_its_packed_model_equals_the_reference(tmp_path):
    from slimport import load_quantized
    from slimport.compress import api
    from slimport.compress.quant.compressed import load_simulated

    src, small, w8 = tmp_path / "src", tmp_path / "small", tmp_path / "w8"
    _bert(BertForSequenceClassification).save_pretrained(src)
    structured.prune_structured(src, small, "heads", 0.5, method="magnitude")
    api.quantize(small, w8, method="rtn", bits=8, progress=False)
    assert json.loads((w8 / "config.json").read_text())["pruned_heads"]  # carried through
    ref = _out(pruned_heads.from_pretrained(AutoModelForSequenceClassification, small), IDS)
    sim, packed = _out(load_simulated(w8)[0], IDS), _out(load_quantized(w8)[0], IDS)
    torch.testing.assert_close(packed, sim, atol=1e-5, rtol=0)
    assert 0 < float((sim - ref).abs().max()) < 0.05  # W8 rounding: small, never nothing


def test_a_head_pruned_bert_exports_to_onnx_and_refuses_uniform_layouts(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from slimport.api import convert

    src, small = tmp_path / "src", tmp_path / "small"
    _bert(BertForSequenceClassification).save_pretrained(src)
    structured.prune_structured(src, small, "heads", 0.5, method="magnitude")
    convert(small, tmp_path / "onnx", to="onnx", progress=False)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    ids = IDS.numpy()
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    names = [i.name for i in session.get_inputs()]
    logits = session.run(["logits"], {k: feed[k] for k in names})[0]
    ref = _out(pruned_heads.from_pretrained(AutoModelForSequenceClassification, small), IDS)
    assert float(np.abs(logits - ref.numpy()).max()) <= TOL
    for to in ("gguf", "mindspore"):  # per-layer head counts: these layouts cannot say them
        with pytest.raises(SlimportError, match="pruned per layer"):
            convert(small, tmp_path / to, to=to, progress=False)
        assert not (tmp_path / to).exists()
