"""MindSpore GPT-2 (runtime/mindspore/gpt2.py) against transformers on small random models:
logits, per-layer hidden states, greedy generation with the KV cache, in PYNATIVE and GRAPH mode.
`-s` prints the max |Δ|s."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from ms_testing import maxdiff

from slimport.errors import SlimportError
from slimport.runtime.mindspore.auto import AutoModel, AutoModelForCausalLM
from slimport.runtime.mindspore.gpt2 import GPT2LMHeadModel, GPT2Model

ATOL = 1e-5
VOCAB = 99


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Random small GPT-2s (tied, untied) saved by transformers; weights large enough that greedy
    decoding does not collapse onto one token."""
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel as HF

    root = tmp_path_factory.mktemp("gpt2")
    out = {}
    for i, tied in enumerate((True, False)):
        torch.manual_seed(i)
        cfg = GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, tie_word_embeddings=tied,
        )  # fmt: skip
        model = HF(cfg).eval()
        model.save_pretrained(root / ("tied" if tied else "untied"))
        out["tied" if tied else "untied"] = (root / ("tied" if tied else "untied"), model)
    return out


@pytest.fixture(scope="module")
def ms_gpt2(gpt2):
    return GPT2LMHeadModel.from_pretrained(gpt2["tied"][0], from_pt=True)


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 9 and 6 tokens, the short one LEFT padded (pad = eos)."""
    ids = np.random.default_rng(0).integers(0, VOCAB - 1, (2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = VOCAB - 1, 0
    return ids, mask


def test_lm_head_logits_and_hidden_states_match(ms_gpt2, gpt2, mode):
    hf = gpt2["tied"][1]
    ids, mask = _batch()
    with torch.no_grad():
        full = hf(torch.from_numpy(ids), output_hidden_states=True)
        padded = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = ms_gpt2(ms.Tensor(ids), output_hidden_states=True)
    d = maxdiff(out.logits, full.logits)
    layers = [maxdiff(a, b) for a, b in zip(out.hidden_states, full.hidden_states, strict=True)]
    got = ms_gpt2(ms.Tensor(ids), ms.Tensor(mask)).logits.asnumpy()
    d_mask = max(maxdiff(got[0], padded.logits[0]), maxdiff(got[1, 3:], padded.logits[1, 3:]))
    print(
        f"\nGPT-2 [{mode}]: logits {d:.2e}, hidden states {max(layers):.2e}, left-padded {d_mask:.2e}"
    )
    assert d <= ATOL and max(layers) <= ATOL and d_mask <= ATOL
    assert list(ms_gpt2(ms.Tensor(ids))) == ["logits"]


def test_untied_head_and_bare_model_match(gpt2):
    from transformers import GPT2Model as HFBare

    ids, mask = _batch()
    folder, hf = gpt2["untied"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert "lm_head.weight" in {p.name for p in model.get_parameters()}
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits
    d = maxdiff(model(ms.Tensor(ids)).logits, expected)
    # the bare model from a causal-LM checkpoint takes `transformer.*` and leaves the head out
    with pytest.warns(UserWarning, match="does not use lm_head.weight"):
        bare = AutoModel.from_pretrained(folder)
    assert isinstance(bare, GPT2Model) and "lm_head.weight" in bare.load_report.ignored
    hf_bare = HFBare.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = hf_bare(torch.from_numpy(ids), output_hidden_states=True)
    out = bare(ms.Tensor(ids), output_hidden_states=True)
    d_bare = maxdiff(out.last_hidden_state, expected.last_hidden_state)
    d_layers = max(
        maxdiff(a, b) for a, b in zip(out.hidden_states, expected.hidden_states, strict=True)
    )
    print(
        f"\nuntied GPT-2 logits {d:.2e}; GPT2Model last hidden {d_bare:.2e}, layers {d_layers:.2e}"
    )
    assert max(d, d_bare, d_layers) <= ATOL


def test_greedy_generation_is_identical_to_transformers(ms_gpt2, gpt2, mode):
    hf = gpt2["tied"][1]
    ids, mask = _batch()
    new = 16
    with torch.no_grad():
        single = hf.generate(torch.from_numpy(ids[:1]), max_new_tokens=new, do_sample=False).numpy()
        batch = hf.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
            do_sample=False,
        ).numpy()  # fmt: skip
    got_single = ms_gpt2.generate(ids[:1], max_new_tokens=new)
    got_batch = ms_gpt2.generate(ms.Tensor(ids), attention_mask=ms.Tensor(mask), max_new_tokens=new)
    assert isinstance(got_batch, ms.Tensor)
    print(f"\nGPT-2 greedy [{mode}]: {got_single[0, 9:].tolist()}")
    assert len(set(single[0, 9:].tolist())) > 3  # a real sequence, not one repeated token
    np.testing.assert_array_equal(got_single, single)
    np.testing.assert_array_equal(got_batch.asnumpy(), batch)
    if mode == "graph":  # prefill + one decode graph, reused by every step
        assert ms_gpt2.generation_step.compile_count <= 2


def test_kv_cache_steps_equal_full_recompute(ms_gpt2):
    """Each cached decode step's logits equal a full forward over the whole sequence so far."""
    ids = _batch()[0][:1]
    out = ms_gpt2.generate(ids, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    seq = out.sequences
    for t, step in enumerate(out.logits):
        full = ms_gpt2(ms.Tensor(seq[:, : 9 + t])).logits.asnumpy()[:, -1]
        assert maxdiff(step, full) <= ATOL


def test_save_pretrained_reloads_bit_exact(ms_gpt2, tmp_path):
    ms_gpt2.save_pretrained(tmp_path / "ms")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "ms")
    ids = ms.Tensor(_batch()[0])
    assert np.array_equal(ms_gpt2(ids).logits.asnumpy(), again(ids).logits.asnumpy())


def test_bad_input(ms_gpt2, gpt2, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(tmp_path / "bert")  # fmt: skip
    with pytest.raises(
        SlimportError, match=r"a bert checkpoint .* cannot load into GPT2LMHeadModel"
    ):
        GPT2LMHeadModel.from_pretrained(tmp_path / "bert")
    with pytest.raises(SlimportError, match="longer than the model's maximum of 64 positions"):
        ms_gpt2.generate(np.ones((1, 70), np.int64), max_new_tokens=2)
    with pytest.raises(SlimportError, match="exceed the model's maximum of 64"):
        ms_gpt2.generate(np.ones((1, 60), np.int64), max_new_tokens=8)
