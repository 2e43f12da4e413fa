"""`slimport analyze`'s estimate of slimport's own peak memory vs a measured run, on a real HF folder.

For convert --to hf, W4 g64 RTN and W4 g64 GPTQ (SAMPLES x SEQ random tokens, batches of 8), each
in a fresh process (tests/pipeline_memory_probe.py, 1 thread): peak RSS above the import
baseline (VmHWM), against `slimport.analyze.pipeline_memory.estimate`.

    .venv/bin/python benchmarks/pipeline_memory.py FOLDER [--samples 16 --seq 256] [--methods convert,rtn,gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

from slimport.analyze.graph import hf_config, meta_model  # noqa: E402
from slimport.analyze.pipeline_memory import estimate  # noqa: E402
from slimport.arch import family_for  # noqa: E402

PROBE = Path(__file__).resolve().parents[1] / "tests" / "pipeline_memory_probe.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--methods", default="convert,rtn,gptq")
    a = ap.parse_args()
    config = json.loads((a.folder / "config.json").read_text())
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[config.get("torch_dtype", "float32")]
    family = family_for(config["model_type"]).name
    est = estimate(meta_model(hf_config(config)), family, itemsize, a.samples, a.seq)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="pipeline-memory-"))
    try:
        for m in a.methods.split(","):
            args = ["convert", a.folder, work / m, "hf"] if m == "convert" else [m, a.folder, work / m, a.samples, a.seq]  # fmt: skip
            run = subprocess.run([sys.executable, str(PROBE), *map(str, args)], capture_output=True, text=True, env=env)  # fmt: skip
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            r = json.loads(run.stdout.strip().splitlines()[-1])
            want = (est["convert"] if m == "convert" else est["quantize"][m])["total"]
            rows.append((m, r["base"], r["peak"] - r["base"], want))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(header("python benchmarks/pipeline_memory.py " + " ".join(sys.argv[1:])))
    print(f"model: {a.folder} ({config['model_type']}, {config['num_hidden_layers']} layers); "
          f"GPTQ calibration {a.samples} x {a.seq} random tokens; 1 thread\n")  # fmt: skip
    print(
        "| pipeline | import baseline (MiB) | measured peak above it (MiB) | estimate (MiB) | error |"
    )
    print("|---|---|---|---|---|")
    M = 2**20
    for m, base, got, want in rows:
        print(
            f"| {m} | {base / M:.0f} | {got / M:.1f} | {want / M:.1f} | {(want - got) / got:+.0%} |"
        )


if __name__ == "__main__":
    main()
