"""One benchmark row in a subprocess of its own (clean memory, its own imports): the worker prints
`RESULT {json}` as its last such line; a failure comes back as {"error": last line}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_row(python: str, argv: list[str], threads: int, name: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    env.pop("PYTHONPATH", None)  # the worker finds this checkout's src/ itself
    t0 = time.perf_counter()
    proc = subprocess.run([python, *argv], capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        print(f"{name}: failed (exit {proc.returncode})\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    r = json.loads(lines[-1][len("RESULT ") :])
    r["wall_seconds"] = time.perf_counter() - t0
    return r
