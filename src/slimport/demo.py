"""`slimport demo`: convert the real MiniLM (TensorFlow .h5) and SmolLM2 (GGUF) checkpoints and
prove the conversions with numbers, on this machine, offline."""

from __future__ import annotations

import time
from pathlib import Path

import mindspore as ms
import numpy as np
import torch

from slimport.convert.loader import convert
from slimport.evaluate.parity import checkpoint_diff, delta
from slimport.io.locate import resolve_model
from slimport.runtime.mindspore.auto import AutoModel as MsAutoModel
from slimport.runtime.mindspore.auto import AutoModelForCausalLM as MsCausalLM

PROMPT = "What is the capital of France?"


START = time.perf_counter()


def _step(title: str) -> None:
    """A section header with the time since the demo started: the demo's progress."""
    print(f"\n== [{time.perf_counter() - START:5.1f} s] {title}", flush=True)


def minilm(out: Path) -> list[tuple[str, str, str]]:
    from transformers import AutoModel

    src = resolve_model("minilm-tf")
    _step(f"MiniLM-L6 (BERT) TensorFlow checkpoint {src / 'tf_model.h5'} -> Hugging Face")
    report = convert(src, out / "minilm-hf", to="hf", progress=False, overwrite=True)
    print(f"converted {report['tensor_count']} tensors in {report['seconds']:.2f} s "
          f"(kernels transposed: {sum('Transpose' in ' '.join(t['ops']) for t in report['tensors'])})")  # fmt: skip
    ref = np.load(src / "reference_outputs.npz")
    model = AutoModel.from_pretrained(out / "minilm-hf").eval()
    with torch.no_grad():
        got = model(
            **{
                k: torch.from_numpy(ref[k])
                for k in ("input_ids", "attention_mask", "token_type_ids")
            }
        )
    d = delta(got.last_hidden_state, torch.from_numpy(ref["last_hidden_state"]))
    print(f"last_hidden_state vs TensorFlow's own outputs: {d}")
    rows = [("MiniLM TF .h5 -> HF", "last_hidden_state vs TF", f"{d.max_abs:.1e}")]
    for to in ("mindspore", "keras"):
        convert(out / "minilm-hf", out / f"minilm-{to}", to=to, progress=False, overwrite=True)
        worst = max(checkpoint_diff(out / "minilm-hf", out / f"minilm-{to}").values())
        print(f"HF -> {to} -> hub: max|Δ| over all tensors = {worst:g}")
        rows.append((f"MiniLM HF -> {to}", "round trip, all tensors", f"{worst:g}"))

    _step("MiniLM loaded into MindSpore straight from the TensorFlow checkpoint (from_tf=True)")
    ms_model = MsAutoModel.from_pretrained(src, from_tf=True)
    inputs = [
        ms.Tensor(ref[k].astype(np.int32))
        for k in ("input_ids", "attention_mask", "token_type_ids")
    ]
    got = ms_model(*inputs)["last_hidden_state"].asnumpy()
    d = delta(torch.from_numpy(got), torch.from_numpy(ref["last_hidden_state"]))
    print(f"MindSpore last_hidden_state vs TensorFlow's own outputs: {d}")
    rows.append(("MiniLM TF .h5 -> MindSpore", "last_hidden_state vs TF", f"{d.max_abs:.1e}"))
    return rows


def smollm2(out: Path) -> list[tuple[str, str, str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_model("smollm2")
    _step(f"SmolLM2-135M-Instruct GGUF (Q4_1, dequantized) {gguf.name} -> Hugging Face safetensors")
    t0 = time.perf_counter()
    report = convert(gguf, out / "smollm2-hf", to="hf", progress=False, overwrite=True)
    ours = time.perf_counter() - t0
    print(f"converted {report['tensor_count']} tensors ({report['parameter_count']:,} parameters) in {ours:.1f} s; "
          f"files: {', '.join(report['files'])}")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out / "smollm2-hf")
    model = AutoModelForCausalLM.from_pretrained(out / "smollm2-hf").eval()
    print("loading the same GGUF with transformers' own loader for reference ...")
    t0 = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    theirs = time.perf_counter() - t0
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        d = delta(model(ids).logits, reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"logits vs transformers' GGUF loading: {d}")
    print(
        f"conversion {ours:.1f} s vs transformers' GGUF load {theirs:.1f} s ({theirs / ours:.1f}x faster)"
    )
    print(
        f"prompt: {PROMPT!r}\nanswer: {tok.decode(answer[0, ids.shape[1] :], skip_special_tokens=True)!r}"
    )
    rows = [("SmolLM2 GGUF -> HF", "logits vs transformers GGUF", f"{d.max_abs:.1e}")]
    for to in ("mindspore", "mindformers", "gguf"):
        convert(out / "smollm2-hf", out / f"smollm2-{to}", to=to, progress=False, overwrite=True)
        worst = max(checkpoint_diff(out / "smollm2-hf", out / f"smollm2-{to}").values())
        print(f"HF -> {to} -> hub: max|Δ| over all tensors = {worst:g}")
        rows.append((f"SmolLM2 HF -> {to}", "round trip, all tensors", f"{worst:g}"))

    _step("SmolLM2 in MindSpore, loaded from the converted MindSpore checkpoint")
    ms_model = MsCausalLM.from_pretrained(out / "smollm2-mindspore")
    np_ids = ids.numpy().astype(np.int32)
    with torch.no_grad():
        d = delta(
            torch.from_numpy(ms_model(ms.Tensor(np_ids))["logits"].asnumpy()), reference(ids).logits
        )
    ms_answer = ms_model.generate(np_ids, max_new_tokens=24, do_sample=False)
    same = ms_answer[0].tolist() == answer[0].tolist()
    print(f"MindSpore logits vs transformers' GGUF loading: {d}")
    print(f"MindSpore answer: {tok.decode(ms_answer[0, np_ids.shape[1] :], skip_special_tokens=True)!r} "
          f"({'identical to' if same else 'DIFFERS from'} transformers' greedy tokens)")  # fmt: skip
    rows.append(("SmolLM2 -> MindSpore", "logits vs transformers GGUF", f"{d.max_abs:.1e}"))
    rows.append(
        (
            "SmolLM2 -> MindSpore",
            "24 greedy tokens vs transformers",
            "identical" if same else "DIFFER",
        )
    )
    return rows


def run(out: str | Path = ".cache/demo") -> int:
    from transformers.utils import logging as hf_logging

    global START
    hf_logging.disable_progress_bar()  # our own lines say what is happening
    START = time.perf_counter()
    out = Path(out)
    rows = minilm(out) + smollm2(out)
    _step("summary")
    w = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'conversion':<{w[0]}}  {'check':<{w[1]}}  max|Δ|")
    for a, b, c in rows:
        print(f"{a:<{w[0]}}  {b:<{w[1]}}  {c}")
    print(f"\noutputs and conversion_report.json files are in {out}/")
    return 0
