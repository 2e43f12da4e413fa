"""ONNX from the command line: `convert --to onnx`, `generate`/`eval --runtime onnx` and `verify`
on an exported folder compute what the torch runtime computes; W8A8 folders export their int8
integers (MatMulInteger); bad input is one clear error and leaves no output behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimport.cli import main
from slimport.errors import SlimportError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny_lm(smollm2_hf, tmp_path_factory):
    """A random 2-layer Llama (GQA, tied) with SmolLM2's tokenizer, as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("tiny") / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(src)
    tok.save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def tiny_onnx(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-onnx") / "onnx"
    assert main(["convert", str(tiny_lm), str(out), "--to", "onnx"]) == 0
    return out


def test_convert_to_onnx_writes_a_runnable_folder(tiny_lm, tiny_onnx):
    from transformers import AutoModelForCausalLM

    from slimport.runtime.onnx import OnnxModel

    files = {p.name for p in tiny_onnx.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "genai_config.json"} <= files
    report = json.loads((tiny_onnx / "conversion_report.json").read_text())
    assert (report["target"], report["kind"], report["dtype"]) == ("onnx", "decoder", "float32")
    ids = np.random.default_rng(0).integers(0, 49152, (1, 12))
    ref = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()(torch.tensor(ids)).logits
    ours = OnnxModel(tiny_onnx).logits(ids)
    assert np.abs(ours - ref.detach().numpy()).max() <= 1e-4


def test_convert_to_onnx_float16_halves_the_weights(tiny_lm, tiny_onnx, tmp_path):
    out = tmp_path / "f16"
    assert main(["convert", str(tiny_lm), str(out), "--to", "onnx", "--dtype", "float16"]) == 0
    assert (out / "model.onnx").stat().st_size < 0.6 * (tiny_onnx / "model.onnx").stat().st_size


def test_generate_in_onnx_runtime_gives_torchs_greedy_tokens(tiny_lm, tiny_onnx, capsys):
    argv = ["--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat"]
    assert main(["generate", str(tiny_lm), "--runtime", "torch", *argv]) == 0
    torch_text = capsys.readouterr().out
    assert main(["generate", str(tiny_onnx), "--runtime", "onnx", *argv]) == 0
    assert capsys.readouterr().out == torch_text
    assert main(["generate", str(tiny_onnx), *argv]) == 0  # an ONNX folder picks ONNX Runtime
    assert capsys.readouterr().out == torch_text
    assert len(torch_text.strip()) > 0


def test_generate_in_onnx_runtime_samples_with_every_option(tiny_onnx, capsys):
    argv = ["generate", str(tiny_onnx), "--prompt", PROMPT, "--prompt", "Once", "--no-chat",
            "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
            "--repetition-penalty", "1.3", "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # seeded: reproducible
    assert first.count(">>> ") == 2


def test_eval_perplexity_in_onnx_runtime_equals_torch(tiny_lm, tiny_onnx, shared, capsys):
    argv = ["--task", "wikitext2", "--windows", "2", "--seq-len", "64", "--json"]
    assert main(["eval", str(tiny_lm), *argv]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_onnx), "--runtime", "onnx", *argv]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert got["windows"] == 2 and got["tokens"] == 2 * 63


def test_verify_passes_on_an_exported_folder(tiny_lm, tiny_onnx, tmp_path, capsys):
    from slimport.evaluate.verify import verify

    report = verify(tiny_lm, tiny_onnx, atol=1e-4, tokens=8)  # runtime: found from the folder
    assert report["runtime"] == "onnx" and report["passed"]
    assert report["greedy"]["first_difference"] is None and len(report["greedy"]["candidate"]) == 8
    assert (
        len(report["tensors"]) == 20 and max(t["max_abs"] for t in report["tensors"].values()) == 0
    )
    assert 0 < report["output"]["max_abs"] <= 1e-4
    assert main(["verify", str(tiny_lm), str(tiny_onnx), "--atol", "1e-4", "--tokens", "4"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_verify_fails_an_export_of_other_weights(tiny_lm, tiny_onnx, tmp_path):
    from safetensors.torch import load_file, save_file

    from slimport.evaluate.verify import verify

    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_lm.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(other / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    report = verify(other, tiny_onnx, atol=1e-4, tokens=0)
    assert not report["passed"]
    worst = max(report["tensors"], key=lambda n: report["tensors"][n]["max_abs"])
    assert worst == "model.layers.1.mlp.down_proj.weight"


# ---------------------------------------------------------------- quantized folders


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w8a8_dynamic_folder_exports_its_int8_integers(tiny_lm, tmp_path, symmetric):
    import onnx
    from onnx import numpy_helper

    from slimport.compress import api
    from slimport.io import safetensors
    from slimport.runtime.onnx import OnnxModel
    from slimport.runtime.torch.quantized import load_quantized

    q = tmp_path / "w8a8"
    api.quantize(tiny_lm, q, progress=False, bits=8, activations="dynamic",
                 symmetric=symmetric, act_symmetric=symmetric)  # fmt: skip
    assert main(["convert", str(q), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    proto = onnx.load(str(tmp_path / "onnx/model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 14 and "MatMulNBits" not in ops
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    with safetensors.read(q / "model.safetensors") as ckpt:
        stored = ckpt.load("model.layers.0.mlp.up_proj.weight")
        assert stored.dtype == torch.int8
        assert np.array_equal(init["model.layers.0.mlp.up_proj.weight_int8"].T, stored.numpy())

    model, info = load_quantized(q)
    assert info["kernels"] == {"int_mm": 14}
    ids = np.random.default_rng(1).integers(0, 49152, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = OnnxModel(tmp_path / "onnx").logits(ids, mask)
    v = mask.astype(bool)
    # equal until a 1-ulp difference of the float parts (norms, softmax) flips one input
    # rounding, which spreads through that token: close, not bit-exact, end to end
    d = np.abs(ours[v] - ref[v])
    assert d.max() <= 1e-2 * np.abs(ref[v]).max()
    assert (ours[v].argmax(-1) == ref[v].argmax(-1)).mean() >= 0.9

    # one Linear fed the same inputs: the integer arithmetic is the torch runtime's exactly
    import onnxruntime as ort

    from slimport.runtime.onnx import w8a8
    from slimport.runtime.onnx.graph import FLOAT, Graph

    lin = model.model.layers[1].mlp.down_proj
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0)) * 4 + 1
    g = Graph("one")
    zero = torch.zeros(1) if lin.packed.zero is None else lin.packed.zero
    arrays = w8a8.weight_arrays(lin.packed.qweight, lin.packed.scale, zero, symmetric)
    y = w8a8.emit(g, g.input("x", FLOAT, [7, 128]), "p", arrays, symmetric, None, None)
    g.output(y, "y", FLOAT, [7, 64])
    session = ort.InferenceSession(
        g.model().SerializeToString(), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - lin(x).numpy()).max() <= 1e-6


def test_verify_compares_a_w4_export_with_its_integers_dequantized(tiny_lm, tmp_path):
    from slimport.compress import api
    from slimport.evaluate.verify import verify

    q = tmp_path / "w4"
    api.quantize(tiny_lm, q, progress=False, bits=4, group_size=32, symmetric=False)
    out = tmp_path / "onnx"
    assert main(["convert", str(q), str(out), "--to", "onnx", "--accuracy-level", "0"]) == 0
    report = verify(q, out, atol=1e-4, tokens=6)
    assert report["passed"], report["output"]
    assert max(t["max_abs"] for t in report["tensors"].values()) <= 1e-6


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_quantized_embedding_is_looked_up_and_tied_on_the_same_integers(tiny_lm, tmp_path, how):
    import onnx

    from slimport.compress import api
    from slimport.runtime.onnx import OnnxModel
    from slimport.runtime.torch.quantized import load_quantized

    q = tmp_path / "w4"
    api.quantize(tiny_lm, q, progress=False, bits=4, group_size=32, symmetric=False)
    out = tmp_path / "onnx"
    argv = ["convert", str(q), str(out), "--to", "onnx", "--accuracy-level", "0"]
    assert main([*argv, "--embeddings", how]) == 0
    assert main([*argv[:2], str(tmp_path / "float-emb"), *argv[3:]]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert (
        ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 2 * 4 + 1
    )  # packed + head
    assert "model.embed_tokens.weight" not in {t.name for t in proto.graph.initializer}
    size = (out / "model.onnx").stat().st_size
    assert size < 0.7 * (tmp_path / "float-emb/model.onnx").stat().st_size

    model, _ = load_quantized(q, embeddings=how)  # the torch runtime's own quantized embedding
    ids = np.random.default_rng(2).integers(0, 49152, (1, 10))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(OnnxModel(out).logits(ids) - ref).max() <= 1e-4


def test_onnxruntime_genai_runs_a_w4_int4_head_export_with_our_greedy_tokens(tiny_lm, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from onnx_testing import genai_greedy

    from slimport.compress import api
    from slimport.runtime.onnx import OnnxModel

    q = tmp_path / "w4"
    api.quantize(tiny_lm, q, progress=False, bits=4, group_size=64, symmetric=False)
    out = tmp_path / "onnx"
    assert main(["convert", str(q), str(out), "--to", "onnx", "--embeddings", "int4"]) == 0
    ids = [1, 504, 3458, 282, 4649, 314]
    theirs = genai_greedy(out, ids, 12)
    ours = OnnxModel(out).generate(np.array([ids]), 12)[0, len(ids) :].tolist()
    assert theirs == ours and len(set(ours)) > 1  # (not one token repeated: a real sequence)


# ---------------------------------------------------------------- MiniLM (real weights)


@pytest.fixture(scope="module")
def dev_subset(shared, tmp_path_factory):
    """The first 64 SST-2 dev sentences (CI-fast; the benchmark runs all 872)."""
    lines = (shared / "data/sst2/dev.tsv").read_text().splitlines()
    path = tmp_path_factory.mktemp("sst2") / "dev64.tsv"
    path.write_text("\n".join(lines[:65]) + "\n")  # header + 64
    return path


def _sst2(folder, data, capsys) -> dict:
    capsys.readouterr()  # what came before (a convert's summary)
    argv = ["eval", str(folder), "--task", "sst2", "--data", str(data), "--json", "--threads", "1"]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_minilm_encoder_via_cli_matches_transformers(minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from slimport.runtime.onnx import OnnxModel

    assert main(["convert", str(minilm_dir), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(["A short one.", "A longer sentence, to pad the first."], padding=True, return_tensors="np")  # fmt: skip
    ours = OnnxModel(tmp_path / "onnx").logits(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        ref = AutoModel.from_pretrained(minilm_dir)(**{k: torch.tensor(v) for k, v in enc.items()})
    v = enc["attention_mask"].astype(bool)
    assert np.abs(ours[v] - ref.last_hidden_state.numpy()[v]).max() <= 1e-4


def test_minilm_sst2_in_onnx_runtime_fp32(sst2_classifier, dev_subset, tmp_path, capsys):
    ref = _sst2(sst2_classifier, dev_subset, capsys)
    fp32 = tmp_path / "fp32"
    assert main(["convert", str(sst2_classifier), str(fp32), "--to", "onnx"]) == 0
    got = _sst2(fp32, dev_subset, capsys)
    assert got["predictions"] == ref["predictions"]  # fp32: the same classifier


def test_minilm_w8a8_sst2_in_onnx_runtime(sst2_classifier, dev_subset, tmp_path, capsys):
    from slimport.compress import api

    ref = _sst2(sst2_classifier, dev_subset, capsys)
    w8a8 = tmp_path / "w8a8"
    api.quantize(sst2_classifier, w8a8, progress=False, bits=8, activations="dynamic")
    torch_int8 = _sst2(w8a8, dev_subset, capsys)
    assert main(["convert", str(w8a8), str(tmp_path / "int8"), "--to", "onnx"]) == 0
    ort_int8 = _sst2(tmp_path / "int8", dev_subset, capsys)
    # equal to the torch W8A8 model's integers until a 1-ulp float difference flips a rounding
    agree = np.mean(np.array(ort_int8["predictions"]) == np.array(torch_int8["predictions"]))
    assert agree >= 62 / 64
    assert ort_int8["accuracy"] >= ref["accuracy"] - 3 / 64


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error_and_leaves_nothing(tiny_lm, tmp_path, capsys, monkeypatch):
    from slimport.compress import api
    from slimport.runtime.onnx import export

    out = tmp_path / "out"

    def refused(argv, match):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert err.startswith("slimport: error:") and match in err, err
        assert not out.exists()

    conv = ["convert", str(tiny_lm), str(out), "--to"]
    refused([*conv, "onnx", "--dtype", "bfloat16"], "unknown ONNX dtype 'bfloat16'")
    refused([*conv, "onnx", "--gguf-type", "q8_0"], "--gguf-type is an option of --to gguf")
    refused([*conv, "gguf", "--accuracy-level", "0"], "--accuracy-level is an option of --to onnx")
    refused([*conv, "hf", "--embeddings", "int8"], "--embeddings is an option of --to onnx")
    w4a8 = tmp_path / "w4a8"
    api.quantize(tiny_lm, w4a8, progress=False, bits=4, group_size=32, activations="dynamic")
    refused(["convert", str(w4a8), str(out), "--to", "onnx"], "MatMulInteger) takes 8-bit weights")
    refused(["convert", str(w4a8), str(out), "--to", "gguf"], "float weights cannot carry")
    monkeypatch.delitem(export.BUILDERS, "llama")
    refused([*conv, "onnx"], "no ONNX graph builder for llama models")
    monkeypatch.undo()
    refused(["eval", str(tiny_lm), "--task", "wikitext2", "--runtime", "onnx"], "not an exported ONNX folder")  # fmt: skip
    refused(["verify", str(tiny_lm), str(tiny_lm), "--runtime", "onnx"], "not an exported ONNX folder")  # fmt: skip


def test_eval_refuses_a_task_the_exported_graph_cannot_run(tiny_onnx, capsys):
    assert main(["eval", str(tiny_onnx), "--task", "sst2"]) == 3
    assert "an ONNX decoder, which cannot run sst2" in capsys.readouterr().err


def test_an_occupied_output_folder_is_refused_unless_overwrite(tiny_lm, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", str(tiny_lm), str(out), "--to", "onnx"]) == 3
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["convert", str(tiny_lm), str(out), "--to", "onnx", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_the_hub_loader_points_graph_targets_to_the_api(tiny_lm, tmp_path):
    from slimport.convert.loader import convert

    with pytest.raises(SlimportError, match="--to onnx builds a graph"):
        convert(tiny_lm, tmp_path / "o", to="onnx")
