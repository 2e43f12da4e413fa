"""Training in MindSpore: LoRA against peft/torch step by step, one-step gradients against
torch, adapters exchanged with peft bit for bit, resuming from checkpoints, mixed precision.

Tiny on purpose (stories260K, a few steps, 16 tokens): the full SmolLM2 measurement is
benchmarks/lora_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")

from slimport import api  # noqa: E402
from slimport.compress import lora  # noqa: E402
from slimport.errors import SlimportError  # noqa: E402
from slimport.finetune.lora import LoraTrainSettings, TorchLora  # noqa: E402
from slimport.runtime.mindspore import lora as ms_lora  # noqa: E402
from slimport.runtime.mindspore.auto import AutoModelForCausalLM  # noqa: E402
from slimport.runtime.mindspore.train import Trainer, causal_lm_loss, cpu_threads  # noqa: E402

cpu_threads(1)  # bit-for-bit repeatable runs (the resume test compares losses exactly)

SETTINGS = lora.LoraSettings(targets=r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj)")


@pytest.fixture(scope="module")
def llama_dir(stories260k, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "hf"
    api.convert(stories260k, out, to="hf", progress=False)
    return out


def _batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, size=(2, 16)).astype(np.int32) for _ in range(n)]


def _ms_lora(llama_dir, settings=SETTINGS, **trainer):
    net = AutoModelForCausalLM.from_pretrained(llama_dir)
    ms_lora.add_lora(net, settings)
    trainer.setdefault("graph", False)
    return net, Trainer(net, causal_lm_loss, ms_lora.param_groups(net, 0.0), lr=1e-2, **trainer)


def test_lora_loss_curve_matches_peft_in_graph_mode(llama_dir):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ours, trainer = _ms_lora(llama_dir, graph=True)
        theirs = TorchLora(llama_dir, SETTINGS, LoraTrainSettings(lr=1e-2))
        assert trainer.params and sum(p.size for p in trainer.params) == theirs.trainable
        for ids in _batches(5):
            want, got = theirs.step(ids.astype(np.int64)), trainer.step(ids)
            assert abs(got - want) <= 1e-4 * abs(want)
        probe = ms.Tensor(_batches(1, seed=5)[0])
        ours.set_train(False)
        adapted = ours(probe)["logits"].asnumpy()
        merged = ms_lora.merge_and_unload(ours)(probe)["logits"].asnumpy()  # recompiled
        assert np.abs(merged - adapted).max() <= 1e-5 * np.abs(adapted).max()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_adapter_goes_to_peft_and_back_bit_exactly(llama_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM as TorchAuto

    net, trainer = _ms_lora(llama_dir)
    for ids in _batches(2):
        trainer.step(ids)
    before = ms_lora.lora_tensors(net)
    ms_lora.save_adapter(net, tmp_path / "ad", SETTINGS, str(llama_dir))
    again = AutoModelForCausalLM.from_pretrained(llama_dir)
    ms_lora.load_adapter(again, tmp_path / "ad")
    after = ms_lora.lora_tensors(again)
    assert set(after) == set(before)
    assert all(np.array_equal(after[k], before[k]) for k in before)

    ids = _batches(1, seed=3)[0][:1]
    net.set_train(False)
    ours = net(ms.Tensor(ids))["logits"].asnumpy()
    by_peft = peft.PeftModel.from_pretrained(TorchAuto.from_pretrained(llama_dir), tmp_path / "ad")
    with torch.no_grad():
        theirs = by_peft.eval()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()

    merged = ms_lora.merge_and_unload(net)
    assert not ms_lora.lora_layers(merged)
    names = {p.name for p in merged.get_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("lora" in n for n in names)
    folded = merged(ms.Tensor(ids))["logits"].asnumpy()
    assert np.abs(folded - ours).max() <= 1e-5 * np.abs(ours).max()


def test_minilm_one_step_gradients_match_torch(minilm_dir):
    from transformers import BertForSequenceClassification as TorchBert

    from slimport.runtime.mindspore.bert import BertForSequenceClassification
    from slimport.runtime.mindspore.train import classification_loss

    with pytest.warns(UserWarning, match="newly initialised"):
        net = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    ref = TorchBert.from_pretrained(minilm_dir, num_labels=2).eval()  # eval: no dropout
    with torch.no_grad():  # the same new head in both
        ref.classifier.weight.copy_(torch.from_numpy(net.classifier.weight.asnumpy()))
        ref.classifier.bias.copy_(torch.from_numpy(net.classifier.bias.asnumpy()))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    # unbalanced labels: with two of each, the head's bias gradient sum(p - y) / 4 cancels to
    # ~1e-5 and both frameworks' float32 rounding of its ±0.125 terms is a large part of it
    labels = np.array([0, 1, 1, 1], np.int32)
    loss = ref(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
    ).loss
    loss.backward()
    trainer = Trainer(
        net, classification_loss, [{"params": net.trainable_params(), "weight_decay": 0.0}],
        lr=1e-4, graph=False,
    )  # fmt: skip
    got_loss, grads = trainer.gradients(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(labels))
    assert abs(float(got_loss.asnumpy()) - loss.item()) <= 1e-5 * loss.item()
    source = {t["target"]: t["sources"] for t in net.load_report.tensors}
    torch_grads = dict(ref.named_parameters())
    pairs = []
    for p, g in zip(trainer.params, grads, strict=True):
        (hub,) = source.get(p.name, [p.name])  # the new head has no source: same name
        want = torch_grads[hub if hub in torch_grads else "bert." + hub].grad.numpy()
        pairs.append((p.name, g.asnumpy(), want))
    assert len(pairs) == len(dict(ref.named_parameters()))
    top = max(np.abs(want).max() for _, _, want in pairs)
    for name, got, want in pairs:
        # key biases shift every score of a query equally: softmax cancels them, their true
        # gradient is zero and both frameworks return rounding noise (~1e-11), compared to `top`
        scale = np.abs(want).max() if np.abs(want).max() > 1e-6 * top else top
        assert np.abs(got - want).max() <= 1e-4 * scale, name


def test_resume_continues_the_same_loss_curve(llama_dir, tmp_path):
    batches = _batches(22)
    _, straight = _ms_lora(llama_dir)
    want = [straight.step(b) for b in batches]

    _, first = _ms_lora(llama_dir)
    for b in batches[:2]:
        first.step(b)
    first.save(tmp_path / "ckpt")
    del first  # "killed": a fresh model, adapter and optimizer resume from the folder
    _, resumed = _ms_lora(llama_dir)
    assert resumed.restore(tmp_path / "ckpt")["step"] == 2
    got = [resumed.step(b) for b in batches[2:]]
    assert got == want[2:]


def test_resume_refuses_a_checkpoint_of_another_model(llama_dir, tmp_path):
    _, trainer = _ms_lora(llama_dir)
    trainer.step(_batches(1)[0])
    trainer.save(tmp_path / "ckpt")
    _, other = _ms_lora(llama_dir, lora.LoraSettings(targets=r".*\.q_proj"))
    with pytest.raises(SlimportError, match="checkpoint of another model or trainable set"):
        other.restore(tmp_path / "ckpt")
    with pytest.raises(SlimportError, match="not a training checkpoint"):
        other.restore(tmp_path)


def test_checkpoint_is_written_atomically(llama_dir, tmp_path, monkeypatch):
    _, trainer = _ms_lora(llama_dir)
    trainer.step(_batches(1)[0])
    trainer.save(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    trainer.step(_batches(1, seed=1)[0])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_lora_targets_matching_nothing_are_an_error(llama_dir):
    net = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(SlimportError, match=r"match none of its 35 linear layers"):
        ms_lora.add_lora(net, lora.LoraSettings(targets="q_proj"))  # a suffix, not a full name


def test_o2_loss_scaler_skips_an_overflowing_step_and_halves_the_scale(llama_dir):
    net, trainer = _ms_lora(llama_dir, amp="O2", loss_scale=2.0**60)
    a = {k: v.copy() for k, v in ms_lora.lora_tensors(net).items()}
    trainer.step(_batches(1)[0])  # the scaled gradients overflow float16
    assert trainer.loss_scale == 2.0**59
    assert all(np.array_equal(a[k], v) for k, v in ms_lora.lora_tensors(net).items())
    assert net.model.layers[0].self_attn.q_proj.base.weight.dtype == ms.float32  # master weights


def test_smollm2_lora_in_mindspore_follows_torch(smollm2_hf, shared, tmp_path):
    """The CI-sized version of benchmarks/lora_parity.py: 3 steps of SmolLM2, 16 tokens."""
    from slimport.finetune.lora import finetune_lora

    text = shared / "data/tinyshakespeare/input.txt"
    train = LoraTrainSettings(steps=3, batch_size=1, seq_len=16, eval_windows=1, ms_graph=False)
    runs = {
        rt: finetune_lora(smollm2_hf, tmp_path / rt, text, train=train, runtime=rt, progress=False)
        for rt in ("torch", "mindspore")
    }
    want, got = runs["torch"]["losses"], runs["mindspore"]["losses"]
    assert all(abs(g - w) <= 1e-3 * abs(w) for g, w in zip(got, want, strict=True))
    assert runs["mindspore"]["trainable_params"] == runs["torch"]["trainable_params"]
    ours, _ = lora.read_adapter(tmp_path / "mindspore")
    theirs, _ = lora.read_adapter(tmp_path / "torch")
    assert set(ours) == set(theirs)
