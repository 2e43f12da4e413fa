"""A/B of decoder graph folders in onnxruntime-genai's og.Model: decode tokens/s, interleaved.

Each round decodes `--new` greedy tokens after an 8-token prompt in every folder in turn (one
og.Model per folder, loaded once), so a load swing slows every folder alike; the table gives the
median per folder and its ratio to the first folder (e.g. the builder's own graph). The small
differences this is made for (a few %) are below a single round's noise: use 20+ rounds.
`--profile`: instead, ONNX Runtime's profiler through og.Model (4 decodes), kernel time per
decode step by op type (MatMulNBits by output width).

    .venv/bin/python benchmarks/genai_ab.py BUILDER_FOLDER OUR_FOLDER ... --threads 1 --rounds 25
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

PROMPT = [1, 504, 2670, 282, 260, 2102, 282, 7042]  # 8 SmolLM2 token ids


def load(folder: str, threads: int, profile: str | None = None):
    import onnxruntime_genai as og

    config = og.Config(folder)
    options: dict = {"intra_op_num_threads": threads}
    if profile:
        options["enable_profiling"] = profile
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def decode(model, new: int) -> tuple[float, list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + new + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    tokens, t0 = [], time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return new / (time.perf_counter() - t0), tokens


def profile(folder: str, args) -> None:
    prefix = f"/tmp/genai_ab_{Path(folder).name}_{args.threads}"
    for f in glob.glob(prefix + "*.json"):
        os.remove(f)
    model = load(folder, args.threads, prefix)
    for _ in range(4):
        decode(model, args.new)
    del model  # writes the profile
    events = json.loads(Path(sorted(glob.glob(prefix + "*.json"))[-1]).read_text())
    runs = sum(e.get("cat") == "Session" and e["name"] == "model_run" for e in events)
    us, nodes = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            if op == "MatMulNBits":
                shape = e["args"].get("output_type_shape", [{}])[0]
                op += f" N={next(iter(shape.values()))[-1]}" if shape else ""
            us[op] += e["dur"]
            nodes[op] += 1
    total = sum(us.values())
    print(
        f"\n{folder}: {runs} runs (prefills and decode steps), kernel us per run {total / runs:.0f}\n"
    )
    print("| op | us / run | share | nodes / run |\n|---|---|---|---|")
    for op, t in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {t / runs:.0f} | {100 * t / total:.1f}% | {nodes[op] / runs:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="graph folders with genai_config.json; the first is the reference")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(header(" ".join(sys.argv), ("onnxruntime", "onnxruntime-genai")))
    if args.profile:
        for folder in args.folders:
            profile(folder, args)
        return
    models = {f: load(f, args.threads) for f in args.folders}
    speed: dict = {f: [] for f in args.folders}
    for _ in range(args.rounds):
        for f, model in models.items():
            speed[f].append(decode(model, args.new)[0])
    base = statistics.median(speed[args.folders[0]])
    print(f"\n{args.threads} thread(s), {args.rounds} interleaved rounds of {args.new} tokens, load average {os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    print("| graph | decode tok/s (median) | x first | min | max |\n|---|---|---|---|---|")
    for f, s in speed.items():
        med = statistics.median(s)
        print(f"| {f} | {med:.1f} | {med / base:.3f}x | {min(s):.1f} | {max(s):.1f} |")


if __name__ == "__main__":
    main()
