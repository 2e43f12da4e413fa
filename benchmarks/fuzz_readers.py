"""Long fuzzing runs of the checkpoint readers (the CI test runs a bounded number of inputs).

    python benchmarks/fuzz_readers.py --seconds 60 [--readers gguf,keras] [--findings DIR]

Mutates the seeds in tests/fuzz_corpus with tests/fuzzing.py's mutator for --seconds per reader,
and prints per reader how many inputs ran, how many read and how many were refused with a
SlimportError, and every finding (another exception, > 10 s, > 1 GB), whose input is saved in
--findings to rerun. `--make-corpus` rewrites the seed files.
"""

from __future__ import annotations

import argparse
import faulthandler
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _machine import header  # noqa: E402
from fuzzing import (  # noqa: E402
    MAX_SECONDS,
    READERS,
    SUFFIX,
    Finding,
    check,
    make_corpus,
    mutate,
    peak_kb,
    seeds,
)


def fuzz(fmt: str, seconds: float, seed: int, work: Path, findings: Path) -> dict:
    corpus, rng = seeds(fmt), random.Random(seed)
    path = work / f"input{SUFFIX[fmt]}"
    counts = {"inputs": 0, "ok": 0, "refused": 0, "findings": 0}
    found: dict[str, Path] = {}
    baseline = peak_kb()
    for data in corpus:  # the seeds read; and what a reader starts once is started untimed
        path.write_bytes(data)
        check(path, fmt, baseline)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = mutate(rng.choice(corpus), rng)
        path.write_bytes(data)
        counts["inputs"] += 1
        # a hang inside a C library (libhdf5) holds the GIL: only faulthandler's own C thread
        # can end it, leaving the input at `path`
        faulthandler.dump_traceback_later(3 * MAX_SECONDS, exit=True)
        try:
            counts[check(path, fmt, baseline)] += 1
        except Finding as e:
            counts["findings"] += 1
            key = str(e).split(" at ")[0][:120]
            if key not in found:  # one saved input per distinct message
                findings.mkdir(parents=True, exist_ok=True)
                found[key] = findings / f"{fmt}-{len(found)}{SUFFIX[fmt]}"
                found[key].write_bytes(data)
        finally:
            faulthandler.cancel_dump_traceback_later()
    counts["distinct"] = found
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="per reader")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings", default=".cache/fuzz-findings")
    ap.add_argument("--make-corpus", action="store_true")
    args = ap.parse_args()
    if args.make_corpus:
        make_corpus()
    print(header(" ".join(sys.argv), packages=("torch", "gguf", "h5py", "safetensors")))
    work = Path(args.findings) / "current"  # an input that hangs stays here
    work.mkdir(parents=True, exist_ok=True)
    print(f"a hang > {3 * MAX_SECONDS} s ends the run with a traceback; its input stays in {work}")
    print("\n| reader | inputs | read | refused | findings |\n| --- | ---: | ---: | ---: | ---: |")
    notes = []
    for fmt in args.readers.split(","):
        c = fuzz(fmt, args.seconds, args.seed, work, Path(args.findings))
        print(
            f"| {fmt} | {c['inputs']} | {c['ok']} | {c['refused']} | {c['findings']} |", flush=True
        )
        notes += [f"{fmt}: {msg} (input: {p})" for msg, p in c["distinct"].items()]
    print("\n" + ("\n".join(notes) if notes else "no findings"))


if __name__ == "__main__":
    main()
