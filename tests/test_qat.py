"""Quantization-aware training: the straight-through fake quantizer, a start that is exactly the
PTQ model, training that moves the integers towards the float model, and the very
compressed-tensors folder PTQ writes. Tiny random models keep it to seconds; the SmolLM2 W4 and
MiniLM W8A8 numbers are in BENCHMARKS.md (benchmarks/qat.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slimport.cli import main
from slimport.compress.quant import primitives as P
from slimport.compress.quant.compressed import load_simulated
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.quant.qat import (
    FakeQuantLinear,
    QATSettings,
    float_model,
    qat_loss,
    quantize_aware,
)
from slimport.errors import SlimportError

FAST = QATSettings(steps=16, lr=3e-5, warmup=0.0)


def test_the_straight_through_estimator():
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=4)
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    scale, zero = P.weight_qparams(*P.minmax(w, args), args)
    x = w.clone().requires_grad_(True)
    y = P.fake_quantize_ste(x, args, scale, zero)
    assert torch.equal(y, P.fake_quantize(w, args, scale, zero))  # forward: the loader's values
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(w))  # min-max grid: every weight inside it
    far = torch.full((3, 8), 100.0, requires_grad=True)  # beyond the grid: the clamp stops it
    P.fake_quantize_ste(far, args, scale, zero).sum().backward()
    assert torch.equal(far.grad, torch.zeros_like(far))


def test_qat_starts_from_the_ptq_model_exactly():
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=8)
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 6)
    ql = QuantLinear.from_linear(lin, *P.rtn(lin.weight.detach(), args), args)
    fq = FakeQuantLinear(ql, lsq=True)
    x = torch.randn(5, 16)
    assert torch.allclose(fq(x), ql(x), atol=1e-6)
    back = fq.to_quant_linear("lin")  # untrained: the very integers and scales PTQ chose
    assert torch.equal(back.qweight, ql.qweight)
    assert torch.allclose(back.weight_scale, ql.weight_scale, rtol=1e-6)


def _out(logits, hidden=None):
    from types import SimpleNamespace

    return SimpleNamespace(logits=torch.tensor(logits), hidden_states=hidden)


def test_mse_loss_weighs_every_rows_logit_error():
    teacher = _out([[9.0, -9.0], [0.1, -0.1]])  # one sure row, one undecided
    student = _out([[8.0, -9.0], [0.1, -0.1]])
    mse = qat_loss(student, teacher, QATSettings(loss="mse"))
    assert mse.item() == pytest.approx((1.0 + 0.0) / 4)  # mean over rows and classes
    # KL barely sees the sure row's error: the float model's p(1-p) there is ~1e-8
    assert qat_loss(student, teacher, QATSettings()).item() < 1e-6


def test_margin_hinge_acts_where_the_student_is_less_decided_than_the_float_model():
    teacher = _out([[3.0, 0.0], [0.2, 0.0]])  # margins 3 and 0.2 for class 0
    hinge = QATSettings(loss="mse", margin_weight=1.0, margin=1.0)
    same = qat_loss(teacher, teacher, hinge)
    assert same.item() == 0.0
    flipped = _out([[3.0, 0.0], [0.0, 0.3]])  # row 2 now says class 1: margin -0.3
    mse = qat_loss(flipped, teacher, QATSettings(loss="mse")).item()
    # hinge of row 2: min(1, 0.2) - (-0.3) = 0.5, averaged over the 2 rows
    assert qat_loss(flipped, teacher, hinge).item() == pytest.approx(mse + 0.25)
    surer = _out([[5.0, 0.0], [0.9, 0.0]])  # more decided than the teacher: no hinge
    assert qat_loss(surer, teacher, hinge).item() == pytest.approx(
        qat_loss(surer, teacher, QATSettings(loss="mse")).item()
    )


def test_hidden_state_term_is_relative_and_skips_padding_and_embeddings():
    torch.manual_seed(0)
    emb, h = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    teacher = _out([[1.0, 0.0]], hidden=(emb, h))
    noisy = h.clone()
    noisy[0, 0] *= 1.1  # a real token off by 10%
    noisy[0, 2] += 100.0  # a padding position: must not count
    student = _out([[1.0, 0.0]], hidden=(emb + 5.0, noisy))  # embeddings are never quantized
    mask = torch.tensor([[1, 1, 0]])
    settings = QATSettings(loss="mse", hidden_weight=2.0)
    expected = 2.0 * (0.1 * h[0, 0]).pow(2).sum() / h[0, :2].pow(2).sum()
    assert qat_loss(student, teacher, settings, mask).item() == pytest.approx(expected.item())


def test_bad_qat_settings_are_refused():
    with pytest.raises(SlimportError, match="loss 'hinge'"):
        QATSettings(loss="hinge")
    with pytest.raises(SlimportError, match="hidden_weight"):
        QATSettings(hidden_weight=-1.0)
    with pytest.raises(SlimportError, match="float_lr"):
        QATSettings(float_lr=-1e-4)
    with pytest.raises(SlimportError, match="temperature"):
        QATSettings(temperature=0.0)


def test_learned_input_zero_point_stays_an_integer_and_moves_the_window():
    args = QuantArgs(bits=8, symmetric=True, granularity="channel")
    in_args = QuantArgs(bits=8, symmetric=False, granularity="tensor")
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    ql = QuantLinear.from_linear(lin, *P.rtn(lin.weight.detach(), args), args, in_args)
    # a window [-1, 1] (scale 2/255, zero 0 -> integers -128..127 cover about -1..1)
    ql.set_input_qparams(torch.tensor(2 / 255), torch.tensor(0))
    fq = FakeQuantLinear(ql, lsq=False, learn_zero=True)
    x = torch.randn(64, 8) + 2.0  # mostly above the window: clamped at the top
    assert torch.allclose(fq(x), ql(x), atol=1e-6)  # step 0: exactly the PTQ layer
    opt = torch.optim.Adam([fq.input_zero], lr=5.0)
    for _ in range(10):
        loss = (fq(x) - lin(x)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    back = fq.to_quant_linear("lin")
    z = back.input_zero_point.item()
    assert z < -20  # the window slid up towards the data (zero point down)
    assert back.input_zero_point.dtype == torch.int8
    assert (back(x) - lin(x)).pow(2).mean() < (ql(x) - lin(x)).pow(2).mean()


def test_sorted_by_length_batches_hold_the_same_sentences_with_less_padding(minilm_dir, shared):
    from slimport.compress.calibration import calibration_inputs
    from slimport.io.hf import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    config = QuantizationConfig(bits=8, calib_data=str(shared / "data/sst2/train.tsv"),
                                num_samples=256, seq_len=128)  # fmt: skip
    plain = calibration_inputs(tok, config.calib_data, config, False, 32)
    tidy = calibration_inputs(tok, config.calib_data, config, False, 32, sort_by_length=True)

    def sentences(batches):
        return sorted(tuple(ids[m.bool()].tolist()) for b in batches
                      for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True))  # fmt: skip

    assert sentences(tidy) == sentences(plain)
    cost = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert cost(tidy) < 0.7 * cost(plain)
    firsts = [b["attention_mask"].sum(1).max().item() for b in tidy]
    assert firsts != sorted(firsts)  # shuffled batches, not shortest first


def test_boundary_draw_takes_the_least_decided_sentences_then_random_ones(minilm_dir):
    """boundary=0.25: a quarter of the QAT sentences are those with the smallest float-model
    margin (here: a fake classifier whose margin is the sentence's number), the rest random."""
    from types import SimpleNamespace

    from slimport.compress.quant.qat import boundary_pool
    from slimport.io.hf import load_tokenizer

    pool = [f"sentence {i}" for i in range(100)]
    tok = load_tokenizer(minilm_dir)

    def teacher(input_ids, **_):  # margin |50 - i| for "sentence i": 48..52 are least decided
        n = torch.tensor([float(tok.decode(row, skip_special_tokens=True).split()[-1])
                          for row in input_ids])  # fmt: skip
        return SimpleNamespace(logits=torch.stack([n, torch.full_like(n, 50.0)], -1))

    config = QuantizationConfig(bits=8, seq_len=16, seed=3)
    picked = boundary_pool(pool, 20, 0.25, teacher, tok, config)
    assert len(picked) == len(set(picked)) == 20
    assert sorted(picked[:5]) == sorted(f"sentence {i}" for i in (48, 49, 50, 51, 52))
    assert picked[5:] == boundary_pool(pool, 20, 0.25, teacher, tok, config)[5:]  # seeded
    assert set(picked[5:]) != set(boundary_pool(pool, 20, 0.25, teacher, tok,
                                                 QuantizationConfig(bits=8, seq_len=16, seed=4))[5:])  # fmt: skip
    with pytest.raises(SlimportError, match="boundary 1.5"):
        QATSettings(boundary=1.5)


@pytest.fixture(scope="module")
def tiny_llama(smollm2_hf, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("qat") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions, as a trained model's
        model.lm_head.weight.mul_(10)
    model.save_pretrained(folder)
    for f in smollm2_hf.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def text(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "shakespeare.txt"
    path.write_text((shared / "data/tinyshakespeare/input.txt").read_text()[:20000])
    return path


def _kl_to_float(folder, source, text_path) -> float:
    from slimport.compress.quant.qat import kd_loss
    from slimport.data import calibration_batches
    from slimport.io.hf import load_tokenizer

    ids = calibration_batches(load_tokenizer(source), text_path, 4, 32, seed=1)
    model, _ = load_simulated(folder)
    with torch.no_grad():
        return float(kd_loss(model(ids).logits, float_model(source)(ids).logits, 1.0))


def test_w4_qat_moves_the_integers_towards_the_float_model(tiny_llama, text, tmp_path):
    from slimport.compress.api import quantize

    config = QuantizationConfig(bits=4, group_size=32, granularity="group", calib_data=str(text),
                                seq_len=32)  # fmt: skip
    quantize(tiny_llama, tmp_path / "ptq", config, progress=False)
    report = quantize_aware(tiny_llama, tmp_path / "qat", config, FAST, progress=False)
    q = report["qat"]
    assert q["steps"] == 16 and 0 < q["integers_changed"] < 0.5
    # held-out windows: the trained integers are closer to the float model than PTQ's
    assert _kl_to_float(tmp_path / "qat", tiny_llama, text) < _kl_to_float(
        tmp_path / "ptq", tiny_llama, text
    )
    # the same format PTQ writes: same tensors, config block, recipe
    cfg = lambda f: json.loads((f / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert cfg(tmp_path / "qat") == cfg(tmp_path / "ptq")
    from safetensors import safe_open

    def names(folder):
        out = set()
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as s:
                out |= set(s.keys())
        return out

    assert names(tmp_path / "qat") == names(tmp_path / "ptq")
    assert json.loads((tmp_path / "qat/qat_report.json").read_text())["steps"] == 16
    from transformers import AutoModelForCausalLM  # compressed-tensors' own loader reads it

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "qat").eval()
    ours, _ = load_simulated(tmp_path / "qat")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)


def _tiny_bert_w8a8(minilm_dir, shared, tmp_path) -> QuantizationConfig:
    """A random 2-layer BERT classifier at tmp_path/bert and a static W8A8 config calibrated on
    128 SST-2 train sentences."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    for f in minilm_dir.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "bert" / f.name)
    rows = (shared / "data/sst2/train.tsv").read_text().splitlines()[:129]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    config = QuantizationConfig(bits=8, activations="static", calib_data=str(tmp_path / "train.tsv"),
                                num_samples=32, seq_len=64)  # fmt: skip
    return config


def test_w8a8_static_qat_learns_input_scales(minilm_dir, shared, tmp_path):
    config = _tiny_bert_w8a8(minilm_dir, shared, tmp_path)
    from slimport.compress.api import quantize

    quantize(tmp_path / "bert", tmp_path / "ptq", config, progress=False)
    quantize_aware(tmp_path / "bert", tmp_path / "qat", config, FAST, progress=False)
    ptq, _ = load_simulated(tmp_path / "ptq")
    qat, qc = load_simulated(tmp_path / "qat")
    assert qc.activations == "static"
    a = ptq.bert.encoder.layer[0].attention.self.query
    b = qat.bert.encoder.layer[0].attention.self.query
    assert isinstance(b, QuantLinear) and not torch.equal(a.input_scale, b.input_scale)
    assert torch.equal(
        a.input_zero_point, b.input_zero_point
    )  # zero points stay: only scales learn


def test_qat_refuses_what_it_cannot_train(tiny_llama, tmp_path):
    config = QuantizationConfig(bits=4, group_size=32, granularity="group")
    with pytest.raises(SlimportError, match="no calib_data"):
        quantize_aware(tiny_llama, tmp_path / "q", config, FAST, progress=False)
    with pytest.raises(SlimportError, match="steps must be positive"):
        quantize_aware(tiny_llama, tmp_path / "q", config, QATSettings(steps=0), progress=False)
    lm = QuantizationConfig(bits=4, group_size=32, granularity="group", calib_data=str(tmp_path))
    with pytest.raises(SlimportError, match="no decision boundary"):
        quantize_aware(tiny_llama, tmp_path / "q", lm, QATSettings(boundary=0.5), progress=False)
    assert not (tmp_path / "q").exists()


def test_cli_quantize_qat(tiny_llama, text, tmp_path, capsys):
    argv = ["quantize", str(tiny_llama), str(tmp_path / "q"), "--bits", "4", "--group-size", "32",
            "--calib-data", str(text), "--seq-len", "32", "--qat", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "QAT: 3 steps" in capsys.readouterr().out
    assert (tmp_path / "q/qat_report.json").is_file()
    assert (
        main([*argv[:2], str(tmp_path / "q2"), "--bits", "4", "--qat", "3", "--quiet"]) == 3
    )  # REFUSED: bad input
    assert "no calib_data" in capsys.readouterr().err


def test_a_recipe_qat_section_runs_qat_and_flags_override_it(tiny_llama, text, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"quantization: {{bits: 4, group_size: 32, calib_data: {text}, seq_len: 32}}\n"
        "qat: {steps: 2, loss: mse, hidden_weight: 0.5, scale_lr: 0.01}\n"
    )
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama), str(out), "--recipe", str(recipe),
                 "--qat-hidden-weight", "0.25", "--quiet"]) == 0  # fmt: skip
    assert "QAT: 2 steps" in capsys.readouterr().out
    ran = json.loads((out / "qat_report.json").read_text())["settings"]
    assert (ran["steps"], ran["loss"], ran["hidden_weight"], ran["scale_lr"]) == (
        2,
        "mse",
        0.25,
        0.01,
    )


def test_qat_options_are_checked_by_name(tiny_llama, text, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"quantization: {{bits: 4, calib_data: {text}}}\nqat: {{steps: 2, lr_w: 1}}\n"
    )
    base = ["quantize", str(tiny_llama), str(tmp_path / "q"), "--quiet"]
    assert main([*base, "--recipe", str(recipe)]) == 3
    assert "qat option lr_w: unknown" in capsys.readouterr().err
    recipe.write_text(f"quantization: {{bits: 4, calib_data: {text}}}\nqat: {{steps: two}}\n")
    assert main([*base, "--recipe", str(recipe)]) == 3
    assert "steps: 'two' is not" in capsys.readouterr().err
    assert main([*base, "--bits", "4", "--qat-loss", "mse"]) == 3  # a QAT flag without QAT
    assert "--qat-loss: QAT options without QAT" in capsys.readouterr().err
    assert main([*base, "--bits", "4", "--calib-data", str(text), "--qat", "2",
                 "--qat-batch-size", "0"]) == 3  # fmt: skip
    assert "batch_size 0: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_float_lr_trains_norms_and_biases_but_not_embeddings(minilm_dir, shared, tmp_path):
    import dataclasses

    from slimport.compress.api import quantize

    config = _tiny_bert_w8a8(minilm_dir, shared, tmp_path)
    quantize(tmp_path / "bert", tmp_path / "ptq", config, progress=False)
    trained = dataclasses.replace(FAST, float_lr=1e-3)
    quantize_aware(tmp_path / "bert", tmp_path / "qat", config, trained, progress=False)
    quantize_aware(tmp_path / "bert", tmp_path / "fixed", config, FAST, progress=False)
    ptq, qat, fixed = (load_simulated(tmp_path / f)[0].bert for f in ("ptq", "qat", "fixed"))
    norm = lambda m: m.encoder.layer[0].attention.output.LayerNorm.weight  # noqa: E731
    bias = lambda m: m.encoder.layer[1].intermediate.dense.bias  # noqa: E731
    emb = lambda m: m.embeddings.word_embeddings.weight  # noqa: E731
    assert not torch.equal(norm(ptq), norm(qat)) and not torch.equal(bias(ptq), bias(qat))
    assert torch.equal(norm(ptq), norm(fixed)) and torch.equal(bias(ptq), bias(fixed))
    assert torch.equal(emb(ptq), emb(qat))  # embeddings never train
