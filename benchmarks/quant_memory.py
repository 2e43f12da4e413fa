"""Layer-by-layer quantization: peak memory on a synthetic sharded Llama checkpoint larger than 3 GB.

Writes (once, cached) a Llama-shaped fp32 checkpoint — hidden 2048, 16 layers, intermediate 5632,
32 heads / 4 KV heads, vocab 32000, untied head: 3.4 GB in ~1 GB safetensors shards, random
weights (only shapes matter) and a config.json, no tokenizer — then quantizes it W4 g128 with RTN
and with GPTQ (32 x 256 random token ids, seed 0, as `calibration=` batches of 8), each in a fresh
subprocess through `slimport.compress.pipeline.quantize`. Per method: peak RSS of that process
(VmHWM, imports included), the RSS right after imports, peak RSS as a share of the checkpoint,
and seconds. The issue's target: peak RSS <= 1.5 GB whatever the model size.

`--stages` also measures the peak RSS inside each pipeline stage (materialize, quantize_block and
its collect / Hessian / gptq / QuantLinear steps, run_block, module_tensors, shard write, free,
_tail) by wrapping those functions in the subprocess and resetting the kernel's high-water mark
(/proc/self/clear_refs) on entering each, and prints the highest: that is where memory is held.

    .venv/bin/python benchmarks/quant_memory.py                      # both methods, all cores
    .venv/bin/python benchmarks/quant_memory.py --methods rtn --threads 1 --stages
    .venv/bin/python benchmarks/quant_memory.py --mmap-threshold 1048576   # glibc heap retention off
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402
from _synthetic import llama_shapes, write_sharded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 2048, 5632, 16, 32, 4, 32000
SHARD = 2**30
TARGET = 1.5e9

# VmHWM is this process's own high-water mark; ru_maxrss of RUSAGE_CHILDREN would be the max over
# every child the driver ever ran (and include the fork of a large parent)
RUNNER = r"""
import functools, json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) // 1024
from slimport.compress import pipeline
from slimport.compress.quant.config import QuantizationConfig
from slimport.compress.quant import gptq as gptq_mod, modules
import slimport.io.safetensors, transformers.models.llama.modeling_llama
base = status("VmHWM")
events, frames, peak = [], [], [base]
def fold():  # the high-water mark so far, into every open stage and the overall peak
    h = status("VmHWM")
    for f in frames:
        f[0] = max(f[0], h)
    peak[0] = max(peak[0], h)
if sys.argv[5] == "1":
    # per-stage peaks: reset VmHWM (clear_refs 5) on entering each stage, read it on leaving;
    # nested stages fold their peak into the enclosing ones
    def wrap(owner, name, label, detail):
        fn = getattr(owner, name)
        @functools.wraps(fn)
        def inner(*a, **k):
            fold()
            open("/proc/self/clear_refs", "w").write("5")
            frames.append([0])
            before = status("VmRSS")
            out = fn(*a, **k)
            fold()
            events.append((label, detail(a), before, frames.pop()[0], status("VmRSS"), status("RssAnon")))
            return out
        is_cls = isinstance(vars(owner).get(name), classmethod)  # fn is already bound then
        setattr(owner, name, staticmethod(inner) if is_cls else inner)
    none = lambda a: ""
    for owner, name, label, detail in [
        (pipeline.Skeleton, "__init__", "Skeleton()", none),
        (pipeline, "capture_inputs", "capture_inputs", none),
        (pipeline.Skeleton, "materialize", "Skeleton.materialize", lambda a: a[2]),
        (pipeline, "quantize_block", "quantize_block", lambda a: a[1]),
        (pipeline, "collect", "quantize_block/collect (stats)", none),
        (gptq_mod.Hessian, "value", "quantize_block/Hessian.value", lambda a: a[0].in_features),
        (gptq_mod, "gptq", "quantize_block/gptq()", lambda a: "x".join(map(str, a[0].shape))),
        (modules.QuantLinear, "from_linear", "quantize_block/QuantLinear.from_linear", none),
        (pipeline, "run_block", "run_block (next inputs)", none),
        (pipeline, "module_tensors", "module_tensors", lambda a: a[1]),
        (slimport.io.safetensors, "write", "safetensors.write (shard)", lambda a: a[0].name),
        (pipeline.Skeleton, "free", "Skeleton.free", none),
        (pipeline, "_tail", "_tail (norm, head)", none),
    ]:
        wrap(owner, name, label, detail)
method = sys.argv[3]
config = QuantizationConfig(bits=4, group_size=128, symmetric=False, method=method)
calibration = None
if method != "rtn":
    ids = torch.randint(0, {vocab}, (32, 256), generator=torch.Generator().manual_seed(0))
    calibration = [{{"input_ids": ids[i : i + 8]}} for i in range(0, 32, 8)]
t0 = time.perf_counter()
rep = pipeline.quantize(sys.argv[1], sys.argv[2], config, calibration, progress=False)
dt = time.perf_counter() - t0
fold()
print(json.dumps({{"base_mb": base, "peak_mb": peak[0], "seconds": dt,
                  "bytes_after": rep["bytes_after"], "events": events}}))
"""


def tensor_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    return llama_shapes(HIDDEN, INTER, layers, HEADS, KV, VOCAB)


def config(layers: int = LAYERS) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }  # fmt: skip


def make_checkpoint(folder: Path, layers: int = LAYERS) -> int:
    """Write the checkpoint unless `folder` already holds this very one; returns its bytes."""
    index = folder / "model.safetensors.index.json"
    cfg = folder / "config.json"
    if index.is_file() and cfg.is_file() and json.loads(cfg.read_text()) == config(layers):
        return json.loads(index.read_text())["metadata"]["total_size"]
    shutil.rmtree(folder, ignore_errors=True)
    return write_sharded(folder, tensor_shapes(layers), config(layers), SHARD)


def stage_peaks(events: list, top: int = 12) -> list[tuple]:
    """Each stage's highest peak RSS (and where), highest first: what holds the memory."""
    best: dict[str, tuple] = {}
    for label, detail, before, peak, after, anon in events:
        if label not in best or peak > best[label][3]:
            best[label] = (label, detail, before, peak, after, anon)
    return sorted(best.values(), key=lambda e: -e[3])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--workdir", type=Path, default=ROOT / ".cache" / "bench-quant-memory",
        help="checkpoint cache (kept) and outputs (deleted)",
    )  # fmt: skip
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer for a smoke run")
    ap.add_argument(
        "--stages", action="store_true", help="measure the peak RSS inside each pipeline stage"
    )
    ap.add_argument(
        "--mmap-threshold", type=int, default=None, metavar="BYTES",
        help="run the subprocesses with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (a fixed threshold: "
        "freed large blocks go back to the OS instead of staying in the heap)",
    )  # fmt: skip
    ap.add_argument("--clean", action="store_true", help="delete the cached checkpoint at the end")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    src = a.workdir / f"llama-{a.layers}-layers"
    t0 = time.perf_counter()
    total = make_checkpoint(src, a.layers)
    print(f"checkpoint: {total / 1e9:.2f} GB at {src} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)  # fmt: skip
    rows = {}
    runner = RUNNER.format(vocab=VOCAB)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads))
    if a.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    try:
        for method in a.methods.split(","):
            out = a.workdir / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{method} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-c", runner, str(src), str(out), method, str(a.threads),
                   "1" if a.stages else "0"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method}: quantization failed (exit {proc.returncode})")
            rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if a.clean:
            shutil.rmtree(a.workdir, ignore_errors=True)
    n_shards = len(list(src.glob("*.safetensors"))) if src.exists() else "?"
    lines = [
        header(
            "python benchmarks/quant_memory.py " + shlex.join(sys.argv[1:]),
            ("torch", "transformers", "compressed-tensors"),
        ),  # fmt: skip
        f"checkpoint: {total / 1e9:.2f} GB fp32, Llama-shaped (hidden {HIDDEN}, {a.layers} layers, "
        f"intermediate {INTER}, vocab {VOCAB}), {n_shards} safetensors shards; W4 asym g128; "
        f"GPTQ calibration 32 x 256 random tokens; {a.threads} thread(s); "
        f"target peak RSS <= {TARGET / 1e9:.1f} GB"
        + (f"; MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}" if a.mmap_threshold is not None else ""),
        "",
        "| method | RSS after imports (MB) | peak RSS (MB) | peak / checkpoint | <= 1.5 GB | time (s) | output MB |",  # fmt: skip
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in rows.items():
        peak = r["peak_mb"] * 2**20
        lines.append(
            f"| {method} | {r['base_mb']} | {r['peak_mb']} | {peak / total:.1%} | "
            f"{'yes' if peak <= TARGET else 'no'} | {r['seconds']:.1f} | {r['bytes_after'] / 1e6:.0f} |"
        )
    for method, r in rows.items():
        if r["events"]:
            lines += ["", f"{method}: peak RSS inside each stage (MB; highest call of each kind)", "",
                      "| stage | of | RSS before | peak during | RSS after | anonymous after |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {e[0]} | {e[1]} | {e[2]} | {e[3]} | {e[4]} | {e[5]} |" for e in stage_peaks(r["events"])]  # fmt: skip
    text = "\n".join(lines)
    print()
    print(text)
    if a.json:
        Path(a.json).write_text(
            json.dumps({"checkpoint_bytes": total, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
