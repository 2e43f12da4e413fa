"""Task data, WikiText-2 perplexity and classification accuracy (slimport.data, slimport.evaluate)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimport.cli import main
from slimport.data import calibration_batches, read_labeled, read_texts, wikitext_windows
from slimport.errors import SlimportError
from slimport.evaluate.classification import sst2_accuracy
from slimport.evaluate.perplexity import perplexity, window_nll

# SmolLM2-135M fp32 (our GGUF -> HF conversion), wiki.test.raw read whole, 16 windows of 512
# tokens: 36.0768, the number, measured independently by the lead (the slow test below).
PPL_16x512 = 36.0768


@pytest.fixture(scope="module")
def wiki(shared):
    return shared / "data/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_hf)


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


# --- perplexity ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_windows(smollm2, wiki):
    """The first 4 WikiText-2 test windows of 512 tokens (tokenizing the file takes seconds)."""
    return wikitext_windows(smollm2[1], wiki, 512, windows=4)


def test_smollm2_wikitext_perplexity_matches_transformers_loss(smollm2, smollm2_windows):
    model, _ = smollm2
    theirs = []

    def with_transformers_loss(ids):  # one forward: our NLL from its logits, its own loss beside
        out = model(ids, labels=ids)
        theirs.append(out.loss.item())
        return out

    result = perplexity(with_transformers_loss, smollm2_windows, progress=False)
    assert (result["windows"], result["seq_len"], result["tokens"]) == (4, 512, 4 * 511)
    assert len(result["nll"]) == 4 and result["seconds"] > 0
    # transformers' shifted cross-entropy (float32) gives the same per-window NLLs
    assert result["nll"] == pytest.approx(theirs, abs=2e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(theirs) / 4), rel=1e-5)
    # a trained 135M model on English prose: far below uniform (49152) and unigram (~1000) levels
    assert 10 < result["perplexity"] < 100


@pytest.mark.slow
def test_smollm2_wikitext_perplexity_16_windows(smollm2, wiki):
    model, tokenizer = smollm2
    result = perplexity(model, wikitext_windows(tokenizer, wiki, 512, windows=16), progress=False)
    assert result["perplexity"] == pytest.approx(PPL_16x512, abs=0.01)


def test_perplexity_batching_does_not_change_the_numbers(smollm2, smollm2_windows):
    windows = smollm2_windows[0].view(8, 64)[:6]
    one = perplexity(smollm2[0], windows, progress=False)
    three = perplexity(smollm2[0], windows, progress=False, batch_size=3)
    assert three["nll"] == pytest.approx(one["nll"], abs=1e-5)


def test_perplexity_accepts_any_callable_returning_logits():
    vocab = 11

    def uniform(ids):  # a model that knows nothing: perplexity = vocabulary size
        return torch.zeros(*ids.shape, vocab)

    result = perplexity(uniform, torch.randint(0, vocab, (3, 9)), progress=False)
    assert result["perplexity"] == pytest.approx(vocab)
    with pytest.raises(SlimportError, match="seq_len >= 2"):
        perplexity(uniform, torch.zeros(3, 1, dtype=torch.long), progress=False)


def test_window_nll_keep_scores_only_the_targets_kept():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    per_token = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = torch.tensor([[True, False, True, True, False], [True] * 5])
    got = window_nll(logits, ids, keep)
    assert float(got[0]) == pytest.approx(float(per_token[0, keep[0]].mean()), rel=1e-6)
    assert torch.allclose(got[1], window_nll(logits, ids)[1])  # all kept: the plain mean


def test_cli_eval_wikitext2_prints_one_json_object(smollm2_hf, wiki, capsys):
    argv = [str(smollm2_hf), "--task", "wikitext2", "--windows", "2", "--seq-len", "128"]
    assert main(["eval", *argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "wikitext2" and result["data"] == str(wiki)
    assert (result["windows"], result["seq_len"], result["tokens"]) == (2, 128, 2 * 127)
    assert 5 < result["perplexity"] < 200
    assert result["perplexity"] == pytest.approx(math.exp(sum(result["nll"]) / 2))


# --- wikitext windows and calibration samples ---------------------------------------------


def test_wikitext_windows_are_the_token_stream_cut_from_the_start(bert_tokenizer, wiki, tmp_path):
    head = tmp_path / "head.raw"  # the real file's first 200 lines, CRLF endings and all
    head.write_bytes(b"".join(wiki.open("rb").readlines()[:200]))
    text = head.read_bytes().decode().replace("\r\n", "\n")
    ids = torch.tensor(bert_tokenizer(text, verbose=False)["input_ids"])
    windows = wikitext_windows(bert_tokenizer, head, 100)
    assert windows.dtype == torch.long and windows.shape == (len(ids) // 100, 100)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert torch.equal(wikitext_windows(bert_tokenizer, head, 100, windows=3), windows[:3])
    with pytest.raises(SlimportError, match=f"asked for {len(windows) + 1} window"):
        wikitext_windows(bert_tokenizer, head, 100, windows=len(windows) + 1)


def test_calibration_windows_are_seeded_slices_of_the_text(bert_tokenizer, tmp_path):
    doc = tmp_path / "calib.txt"
    doc.write_text("\n\n".join(f"Paragraph {i} talks about topic {i * 7}." for i in range(60)))
    ids = torch.tensor(bert_tokenizer(doc.read_text(), verbose=False)["input_ids"])
    batch = calibration_batches(bert_tokenizer, doc, num_samples=8, seq_len=32, seed=3)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    for row in batch:  # every sample is a contiguous window of the tokenized document
        assert any(torch.equal(row, ids[s : s + 32]) for s in range(len(ids) - 32))
    assert torch.equal(batch, calibration_batches(bert_tokenizer, doc, 8, 32, seed=3))
    assert not torch.equal(batch, calibration_batches(bert_tokenizer, doc, 8, 32, seed=4))


def test_calibration_from_sentences_joins_them_with_eos(smollm2, tmp_path):
    _, tokenizer = smollm2
    rows = tmp_path / "sents.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"sentence number {i}"}) for i in range(40)))
    batch = calibration_batches(tokenizer, rows, num_samples=4, seq_len=16)
    assert batch.shape == (4, 16)
    assert (batch == tokenizer.eos_token_id).any(dim=1).all()  # ~4 tokens per sentence


def test_calibration_errors_name_the_file_and_numbers(bert_tokenizer, tmp_path):
    doc = tmp_path / "short.txt"
    doc.write_text("just a few words")
    with pytest.raises(SlimportError, match=r"short.txt: too short .* 6 tokens.*at least 33"):
        calibration_batches(bert_tokenizer, doc, 4, 32)
    with pytest.raises(SlimportError, match="num_samples >= 1"):
        calibration_batches(bert_tokenizer, doc, 0, 2)


# --- reading task files --------------------------------------------------------------------


def test_read_texts_of_each_file_kind(tmp_path):
    (tmp_path / "a.txt").write_text(" = Title = \n \n First line\nstill first . \n\n\n Second . \n")
    assert read_texts(tmp_path / "a.txt") == ["= Title =", "First line\nstill first .", "Second ."]
    (tmp_path / "b.tsv").write_text('sentence\tlabel\nit \'s a "charming" film \t1\nbleak\t0\n')
    assert read_texts(tmp_path / "b.tsv") == ['it \'s a "charming" film', "bleak"]
    assert read_labeled(tmp_path / "b.tsv") == (['it \'s a "charming" film ', "bleak"], [1, 0])
    (tmp_path / "c.jsonl").write_text('{"text": "one", "q": "x"}\n\n{"text": "two", "q": "y"}\n')
    assert read_texts(tmp_path / "c.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "c.jsonl", column="q") == ["x", "y"]


@pytest.mark.parametrize(
    ("name", "content", "column", "message"),
    [
        ("missing.txt", None, None, "missing.txt: no such file"),
        ("empty.txt", " \n\n", None, "empty.txt: the file is empty"),
        ("header_only.tsv", "text\tlabel\n", None, "header_only.tsv: the file is empty"),
        ("data.csv", "text\nhi\n", None, "unknown task file type '.csv'"),
        ("rows.tsv", "review\tlabel\nok\t1\n", None, "no text column 'text' or 'sentence'"),
        ("rows.jsonl", '{"text": "a"}\n', "body", "no text column 'body'; the file has 'text'"),
        ("bad.jsonl", '{"text": "a"}\n{oops\n', None, r"bad.jsonl:2: not valid JSON"),
    ],
)
def test_read_texts_errors(tmp_path, name, content, column, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SlimportError, match=message):
        read_texts(path, column=column)


def test_read_labeled_rejects_non_integer_labels(tmp_path):
    (tmp_path / "l.tsv").write_text("text\tlabel\ngood\tpositive\n")
    with pytest.raises(SlimportError, match="row 1: label 'positive' is not an integer"):
        read_labeled(tmp_path / "l.tsv")


# --- classification ------------------------------------------------------------------------


class ParityClassifier(torch.nn.Module):
    """Predicts class = (number of tokens) % 2: known answers that depend on each sentence."""

    def forward(self, input_ids, attention_mask, **_):
        return torch.nn.functional.one_hot(attention_mask.sum(-1) % 2, 2).float()


def test_sst2_accuracy_keeps_input_order_across_sorted_batches(bert_tokenizer, tmp_path):
    texts = [" ".join(["word"] * (1 + (i * 7) % 13)) for i in range(50)]
    expected = [len(bert_tokenizer(t)["input_ids"]) % 2 for t in texts]
    labels = [e if i % 5 else 1 - e for i, e in enumerate(expected)]  # every 5th one wrong
    data = tmp_path / "set.tsv"
    data.write_text(
        "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True))
    )
    result = sst2_accuracy(ParityClassifier(), bert_tokenizer, data, batch_size=7)
    assert result["predictions"] == expected
    assert (result["n"], result["accuracy"]) == (50, 0.8)
    flipped = [1 - p if i < 10 else p for i, p in enumerate(expected)]
    again = sst2_accuracy(ParityClassifier(), bert_tokenizer, data, reference=flipped)
    assert again["agreement"] == 0.8
    with pytest.raises(SlimportError, match="reference has 3 predictions, the set has 50"):
        sst2_accuracy(ParityClassifier(), bert_tokenizer, data, reference=[0, 1, 0])


def test_cli_eval_refuses_a_model_without_the_task_head(minilm_dir, capsys):
    assert main(["eval", str(minilm_dir), "--task", "sst2"]) == 3
    assert "a BertModel, which has no SequenceClassification head" in capsys.readouterr().err


# --- quantized folders run on the packed runtime --------------------------------------------


@pytest.fixture(scope="module")
def tiny_quantized_lm(smollm2_hf, tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved W4 g32 asymmetric (RTN)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimport.compress import api

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("tiny") / "fp32"
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    out = src.parent / "w4"
    api.quantize(src, out, progress=False, bits=4, group_size=32, symmetric=False)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_loads_a_quantized_folder_with_integer_only_layers(tiny_quantized_lm, dtype):
    from slimport.compress.quant.modules import QuantLinear
    from slimport.evaluate.models import load_for_eval
    from slimport.runtime.torch.packed import PackedLinear

    model, _ = load_for_eval(tiny_quantized_lm, "wikitext2", dtype)
    modules = list(model.modules())
    assert sum(isinstance(m, PackedLinear) for m in modules) == 2 * 7  # q k v o gate up down
    assert not any(isinstance(m, QuantLinear) for m in modules)
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert plain == ["lm_head"]  # left float by the recipe
    floats = {t.dtype for t in model.parameters() if t.is_floating_point()}
    assert floats == {getattr(torch, dtype)}


def test_cli_eval_of_a_quantized_folder_equals_the_simulated_reference(tiny_quantized_lm, wiki, capsys):  # fmt: skip
    from slimport.compress.quant.compressed import load_simulated
    from slimport.runtime.text import load_tokenizer

    argv = [str(tiny_quantized_lm), "--task", "wikitext2", "--windows", "2", "--seq-len", "64"]
    assert main(["eval", *argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    reference, _ = load_simulated(tiny_quantized_lm)
    windows = wikitext_windows(load_tokenizer(tiny_quantized_lm), wiki, 64, windows=2)
    assert got["perplexity"] == pytest.approx(perplexity(reference, windows)["perplexity"], rel=1e-5)  # fmt: skip
    assert main(["eval", *argv, "--json", "--compute-dtype", "bfloat16"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["perplexity"] == pytest.approx(got["perplexity"], rel=0.05)


def test_generate_with_torch_runs_a_quantized_folder(tiny_quantized_lm, capsys):
    from slimport.compress.quant.compressed import load_simulated
    from slimport.runtime.text import encode_prompts, load_tokenizer

    prompt = "The capital of France is"
    argv = ["generate", str(tiny_quantized_lm), "--prompt", prompt, "--runtime", "torch"]
    assert main([*argv, "--max-new-tokens", "8", "--no-chat"]) == 0
    got = capsys.readouterr().out
    tok = load_tokenizer(tiny_quantized_lm)
    ids, _ = encode_prompts(tok, [prompt], chat=False)
    reference, _ = load_simulated(tiny_quantized_lm)
    with torch.no_grad():
        out = reference.generate(
            torch.from_numpy(ids).long(), max_new_tokens=8, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    assert got == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    assert main([*argv, "--max-new-tokens", "4", "--compute-dtype", "bfloat16"]) == 0
