"""Knowledge distillation: students cut from a teacher, the KD loss, the teacher-logit cache and
the command. Tiny random teachers with the real tokenizers keep every run to seconds; the real
MiniLM -> 3-layer and SmolLM2 numbers are in BENCHMARKS.md (benchmarks/distill_*.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slimport.cli import main
from slimport.compress import distill as D
from slimport.compress.students import layer_map, parse_layers, select_layers
from slimport.errors import SlimportError

FAST = D.DistillSettings(max_steps=12, batch_size=8, lr=1e-3, warmup=0.0, seq_len=32, top_k=16)


@pytest.fixture(scope="module")
def tiny_bert(minilm_dir, tmp_path_factory):
    """A random 4-layer BERT classifier (hidden 32) with MiniLM's tokenizer; its head scaled up
    so the teacher is confident and differs from a student cut from it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("teacher") / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0)  # fmt: skip
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sst2_small(shared, tmp_path_factory):
    rows = (shared / "data/sst2/train.tsv").read_text().splitlines()[:97]  # header + 96
    path = tmp_path_factory.mktemp("data") / "train96.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _run(teacher, out, data, tmp_path, settings=FAST, **kw):
    return D.distill(teacher, out, train=data, settings=settings, progress=False,
                     cache_dir=tmp_path / "cache", **kw)  # fmt: skip


def test_layer_specs_pick_teacher_layers():
    assert parse_layers("every:2", 6) == [0, 2, 4]  # DistilBERT's init
    assert parse_layers("layers:0,2-3", 6) == [0, 2, 3]
    assert parse_layers("depth:3", 7) == [0, 3, 6]
    assert parse_layers("depth:21", 30)[:2] == [0, 1] and len(parse_layers("depth:21", 30)) == 21
    # each student layer answers for the end of the span it replaces; else uniform
    assert layer_map(3, 6, [0, 2, 4]) == [1, 3, 5]
    assert layer_map(2, 6, None) == [2, 5]
    for bad in ("layers:0,9", "every:0", "top:3", "layers:a"):
        with pytest.raises(SlimportError, match="--student"):
            parse_layers(bad, 6)


def test_a_student_cut_from_the_teacher_holds_its_layers(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    student = select_layers(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for s, t in ((0, 1), (1, 3)):
        a, b = (
            student.bert.encoder.layer[s].state_dict(),
            teacher.bert.encoder.layer[t].state_dict(),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(teacher.bert.encoder.layer) == 4  # a copy: the teacher is untouched


def test_kd_loss_is_zero_only_when_the_student_matches():
    t = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    idx = torch.arange(3).expand(2, 3)
    assert D.kd_loss(t, t, idx, 2.0).abs() < 1e-6
    assert D.kd_loss(t.flip(-1), t, idx, 2.0) > 0.1
    # the T^2 factor: gradients keep their size as T grows (Hinton et al.)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(t.flip(-1) / 3, -1), torch.log_softmax(t / 3, -1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    assert torch.allclose(D.kd_loss(t.flip(-1), t, idx, 3.0), 9 * ref)


def test_sst2_distillation_learns_and_caches_the_teacher(tiny_bert, sst2_small, tmp_path):
    report = _run(tiny_bert, tmp_path / "s1", sst2_small, tmp_path)
    assert report["student"] == "teacher layers [0, 2] of 4"
    assert report["student_layers"] == 2 and report["steps"] == 12
    assert report["teacher_cache"]["computed"] > 0
    losses = report["losses"]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # the teacher ran once: a second run reads its logits and trains to the very same weights
    again = _run(tiny_bert, tmp_path / "s2", sst2_small, tmp_path)
    assert again["teacher_cache"]["computed"] == 0
    a, b = (
        load_file(tmp_path / "s1/model.safetensors"),
        load_file(tmp_path / "s2/model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "s1/config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and (tmp_path / "s1/tokenizer.json").is_file()


def test_cached_logits_are_the_teachers(tiny_bert, sst2_small, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = _run(tiny_bert, tmp_path / "s", sst2_small, tmp_path)
    cache = torch.load(report["teacher_cache"]["file"], weights_only=True)
    rows = cache["done"].nonzero().flatten()[:4].tolist()
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    texts = [line.split("\t")[0] for line in sst2_small.read_text().splitlines()[1:]]
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        for i in rows:
            want = teacher(**tok(texts[i], return_tensors="pt")).logits[0]
            assert torch.allclose(cache["values"][i].float(), want, atol=2e-3)


def test_hidden_state_and_attention_losses(tiny_bert, sst2_small, tmp_path):
    from dataclasses import replace

    s = replace(FAST, hidden_loss="cosine", attention_weight=1.0, max_steps=4)
    report = _run(tiny_bert, tmp_path / "s", sst2_small, tmp_path, settings=s)
    assert report["layer_map"] == [1, 3] and report["teacher_cache"] is None
    assert all(torch.isfinite(torch.tensor(report["losses"])))


def test_a_narrower_student_needs_a_projection(tiny_bert, sst2_small, tmp_path):
    from dataclasses import replace

    cfg = json.loads((tiny_bert / "config.json").read_text())
    cfg.update(hidden_size=16, num_hidden_layers=2, intermediate_size=32)
    (tmp_path / "small.json").write_text(json.dumps(cfg))
    s = replace(FAST, hidden_loss="mse", max_steps=3)
    with pytest.raises(SlimportError, match="hidden size 16 .* teacher's 32 without a projection"):
        _run(tiny_bert, tmp_path / "s", sst2_small, tmp_path, settings=s,
             student=tmp_path / "small.json")  # fmt: skip
    assert not (tmp_path / "s").exists()  # nothing half-written
    report = _run(tiny_bert, tmp_path / "s", sst2_small, tmp_path,
                  settings=replace(s, hidden_projection=True), student=tmp_path / "small.json")  # fmt: skip
    assert report["student"].startswith("random init") and report["parameters"]["student"] > 0


def test_plain_training_needs_no_teacher(tiny_bert, sst2_small, tmp_path):
    from dataclasses import replace

    report = _run(
        tiny_bert, tmp_path / "s", sst2_small, tmp_path, settings=replace(FAST, alpha=0.0)
    )
    assert report["teacher_cache"] is None and report["steps"] == 12


def test_bad_training_data_is_refused(tiny_bert, sst2_small, tmp_path):
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "unlabelled.tsv").write_text("sentence\nit was fine\n")
    (tmp_path / "classes.tsv").write_text("sentence\tlabel\ngood\t1\nodd\t7\n")
    for name, message in (("empty.tsv", "empty"), ("unlabelled.tsv", "no label column"),
                          ("classes.tsv", "label 7 is not one of the teacher's 2 classes")):  # fmt: skip
        with pytest.raises(SlimportError, match=message):
            _run(tiny_bert, tmp_path / "s", tmp_path / name, tmp_path)
        assert not (tmp_path / "s").exists()
    with pytest.raises(SlimportError, match="alpha 1.5"):
        _run(tiny_bert, tmp_path / "s", sst2_small, tmp_path, settings=D.DistillSettings(alpha=1.5))


@pytest.fixture(scope="module")
def tiny_llama(smollm2_hf, tmp_path_factory):
    """A random 4-layer Llama with SmolLM2's tokenizer (and vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("teacher") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in smollm2_hf.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


def test_lm_distillation_on_text_windows(tiny_llama, shared, tmp_path):
    text = tmp_path / "shakespeare.txt"
    text.write_text((shared / "data/tinyshakespeare/input.txt").read_text()[:20000])
    from dataclasses import replace

    s = replace(FAST, batch_size=2, max_steps=10)
    report = _run(tiny_llama, tmp_path / "s", text, tmp_path, settings=s, task="lm",
                  student="depth:3")  # fmt: skip
    assert report["student"] == "teacher layers [0, 2, 3] of 4"
    cache = torch.load(report["teacher_cache"]["file"], weights_only=True)
    assert cache["values"].shape[1:] == (32, 16)  # top-16 logits at each of 32 positions
    losses = report["losses"]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert [a.self_attn.layer_idx for a in student.model.layers] == [0, 1, 2]


def test_cli_distill(tiny_bert, sst2_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMPORT_CACHE", str(tmp_path / "cache"))
    rows = sst2_small.read_text().splitlines()[:21]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    argv = ["distill", str(tiny_bert), str(tmp_path / "out"), "--student", "layers:0,3",
            "--train", str(sst2_small), "--dev", str(tmp_path / "dev.tsv"), "--max-steps", "4",
            "--batch-size", "8", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher layers [0, 3] of 4" in out and "accuracy" in out
    report = json.loads((tmp_path / "out/distill_report.json").read_text())
    assert 0 <= report["accuracy"] <= 1
    assert (
        main([*argv[:2], str(tmp_path / "o2"), "--student", "layers:7", *argv[5:]]) == 3
    )  # REFUSED: bad input
    assert "the teacher has layers 0..3" in capsys.readouterr().err


def test_distillation_recovers_a_pruned_student_without_undoing_its_sparsity(
    tiny_llama, shared, tmp_path
):
    """--keep-sparsity: the student is a 2:4-pruned copy of the teacher; distillation from the
    dense teacher moves its kept weights but every pruned weight is still exactly zero."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from slimport.compress.prune import api

    text = tmp_path / "shakespeare.txt"
    text.write_text((shared / "data/tinyshakespeare/input.txt").read_text()[:20000])
    pruned = tmp_path / "pruned"
    api.prune(tiny_llama, pruned, method="magnitude", pattern="2:4", progress=False)
    before = _block_linears(AutoModelForCausalLM.from_pretrained(pruned))
    s = replace(FAST, batch_size=2, max_steps=10, alpha=1.0, keep_sparsity=True)
    report = _run(tiny_llama, tmp_path / "s", text, tmp_path, settings=s, task="lm",
                  student=str(pruned))  # fmt: skip
    assert report["sparsity"] == {"modules": len(before), "zeros": 0.5}
    after = _block_linears(AutoModelForCausalLM.from_pretrained(tmp_path / "s"))
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0), name  # the same zeros, no new ones
        assert not torch.equal(after[name], w), name  # and the kept weights trained
    losses = report["losses"]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # a dense student has nothing to keep: said, not silently ignored
    with pytest.raises(SlimportError, match="has no zero weights"):
        _run(tiny_llama, tmp_path / "d", text, tmp_path, settings=s, task="lm", student="depth:3")
    assert not (tmp_path / "d").exists()


def _block_linears(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.model.layers.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
