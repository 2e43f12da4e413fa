"""Streaming conversion: peak memory and throughput on a synthetic sharded Llama checkpoint.

Writes a Llama-shaped fp32 checkpoint of --size-gb GB as 512 MB safetensors shards (random
weights: only shapes matter here), then converts it to each target in a fresh subprocess and
prints peak RSS (ru_maxrss of that process, imports included), the RSS right after imports,
and MB/s. Promise: peak RSS stays under 25% of the checkpoint size.

    .venv/bin/python benchmarks/convert_memory.py --size-gb 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402
from _synthetic import llama_shapes, write_sharded  # noqa: E402

HIDDEN, INTER, HEADS, KV, VOCAB = 1024, 2816, 16, 4, 32000
SHARD = 512 * 2**20

# VmHWM (this process's own RSS high-water mark); ru_maxrss would inherit the parent's across fork
RUNNER = r"""
import json, sys, time
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
from slimport import api
import slimport.io.{module}  # the writer's imports (e.g. MindSpore) count as baseline
base = hwm()
t0 = time.perf_counter()
api.convert(sys.argv[1], sys.argv[2], to=sys.argv[3], progress=False)
dt = time.perf_counter() - t0
print(json.dumps({{"base_kb": base, "peak_kb": hwm(), "seconds": dt}}))
"""
MODULES = {"mindspore": "mindspore_ckpt", "gguf": "gguf", "hf": "hf"}


def layer_bytes() -> int:
    head = HIDDEN // HEADS
    per = 2 * HIDDEN * HIDDEN + 2 * KV * head * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    return 4 * per


def make_checkpoint(folder: Path, size_gb: float) -> int:
    layers = max(1, round((size_gb * 1e9 - 4 * (2 * VOCAB * HIDDEN + HIDDEN)) / layer_bytes()))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }  # fmt: skip
    return write_sharded(
        folder, llama_shapes(HIDDEN, INTER, layers, HEADS, KV, VOCAB), config, SHARD
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument(
        "--work", default=".cache/bench-memory", help="scratch folder (deleted afterwards)"
    )
    ap.add_argument("--targets", default="mindspore,gguf,hf")
    args = ap.parse_args()
    work = Path(args.work)
    src = work / "src"
    t0 = time.perf_counter()
    total = make_checkpoint(src, args.size_gb)
    print(f"wrote synthetic checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    rows = []
    try:
        for target in args.targets.split(","):
            out = work / f"out-{target}"
            proc = subprocess.run(
                [sys.executable, "-c", RUNNER.format(module=MODULES[target]), str(src), str(out), target],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode:
                print(proc.stderr[-3000:])
                raise SystemExit(f"conversion to {target} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out_bytes = sum(f.stat().st_size for f in out.iterdir())
            rows.append((target, r["base_kb"] / 1024, r["peak_kb"] / 1024, r["seconds"], out_bytes))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(header(f"python benchmarks/convert_memory.py --size-gb {args.size_gb:g}"))
    print(
        f"checkpoint: {total / 1e9:.2f} GB fp32, Llama-shaped, {total // SHARD + 1} safetensors shards"
    )
    print()
    print(
        "| target | RSS after imports (MB) | peak RSS (MB) | peak / checkpoint | time (s) | MB/s |"
    )
    print("|---|---|---|---|---|---|")
    for target, base, peak, secs, _ in rows:
        print(
            f"| {target} | {base:.0f} | {peak:.0f} | {peak * 2**20 / total:.1%} | {secs:.1f} | {total / 1e6 / secs:.0f} |"
        )


if __name__ == "__main__":
    main()
