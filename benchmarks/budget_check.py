"""Does a `slimport sensitivity --budget "ppl<=+5%"` recipe hold on text the search never saw?

Runs the search as the command line does (`slimport sensitivity ... --budget --recipe-out
--json`, on WikiText-2 *valid*), then quantizes a fresh float model with the recipe it wrote
(`pipeline.quantize_`, as `slimport quantize --recipe` does) and scores it on the standard
protocol: the first 16 x 512-token windows of WikiText-2 raw *test* (never seen by the search).
Prints the recipe's bits/weight, its perplexity on the search's slice (mean and the upper bound
the budget was checked against) and on the test windows, against float.

    python benchmarks/budget_check.py --windows 8 --unit block --method rtn
    python benchmarks/budget_check.py --windows 8 --check-windows 16 --confidence 0.9
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

from slimport.cli import main  # noqa: E402
from slimport.data import shared_dir, wikitext_windows  # noqa: E402

W8_BITS = 8.047  # uniform W8 per channel on SmolLM2-135M, scales counted (BENCHMARKS #18)


def search_argv(a: argparse.Namespace, out: Path) -> list[str]:
    valid = str(shared_dir() / "data/wikitext-2/valid.txt")
    argv = ["sensitivity", a.model, "--eval-data", valid, "--windows", str(a.windows),
            "--seq-len", str(a.seq_len), "--method", a.method, "--bits", "4", "--group-size",
            str(a.group_size), "--unit", a.unit, "--budget", a.budget, "--recipe-out",
            str(out / "mixed.yaml"), "--json", str(out / "search.json"), "--quiet"]  # fmt: skip
    if a.method != "rtn":
        argv += ["--calib-data", valid]
    if a.check_windows:
        argv += ["--check-windows", str(a.check_windows)]
    if a.confidence is not None:
        argv += ["--confidence", str(a.confidence)]
    if a.score_unk:
        argv += ["--score-unk"]
    return argv


def test_perplexity(model_dir: str, recipe: Path | None, windows: int, seq_len: int) -> dict:
    """Perplexity of the float model (recipe None) or of the recipe's quantized model on the
    first `windows` windows of WikiText-2 raw test."""
    from slimport.compress import pipeline
    from slimport.compress.calibration import calibration_inputs
    from slimport.compress.quant.config import QuantizationConfig
    from slimport.evaluate.models import load_for_eval
    from slimport.evaluate.perplexity import perplexity

    model, tok = load_for_eval(Path(model_dir), "wikitext2")
    model.float().eval()
    if recipe is not None:
        config = QuantizationConfig.from_yaml(recipe)
        calib = (
            calibration_inputs(tok, config.calib_data, config, True)
            if config.needs_calibration
            else None
        )
        pipeline.quantize_(model, config, calib)
    test = shared_dir() / "data/wikitext-2-raw/wiki.test.raw"
    return perplexity(model, wikitext_windows(tok, test, seq_len, windows), progress=False)


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".cache/models/smollm2-135m")
    ap.add_argument("--budget", default="ppl<=+5%")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--check-windows", type=int, default=0)
    ap.add_argument("--confidence", type=float, help="default: the command's (0.9)")
    ap.add_argument("--score-unk", action="store_true", help="score <unk> on the slice too")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--unit", default="block")
    ap.add_argument("--test-windows", type=int, default=16)
    ap.add_argument("--float-ppl", type=float, help="skip scoring float on test: this value")
    ap.add_argument("--out", help="folder for mixed.yaml and search.json (default: a temp dir)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="budget-check-"))
    out.mkdir(parents=True, exist_ok=True)
    argv = search_argv(a, out)
    print(header("slimport " + shlex.join(argv), ("torch", "transformers")), flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    search_s = time.perf_counter() - t0
    if rc != 0:
        print(f"search exited {rc}")
        return rc
    result = json.loads((out / "search.json").read_text())
    b, chosen = result["budget"], result["budget"]["chosen"]
    t0 = time.perf_counter()
    q = test_perplexity(a.model, out / "mixed.yaml", a.test_windows, a.seq_len)
    check_s = time.perf_counter() - t0
    fp = a.float_ppl or test_perplexity(a.model, None, a.test_windows, a.seq_len)["perplexity"]
    limit = float(b["budget"].split("+")[1].rstrip("%")) / 100
    test_delta = q["perplexity"] / fp - 1
    bound = f"{chosen['bound'] * 100:+.2f}%" if "bound" in chosen else "-"
    slice_ = f"{b['scored_on']['windows']} x {a.seq_len} valid" + (
        " (check windows)" if b["scored_on"]["check"] else " (cost windows)"
    )
    print(f"\nsearch {search_s:.0f} s, test check {check_s:.0f} s; recipe {out / 'mixed.yaml'}")
    print(f"chosen: {chosen['label']}, {chosen['schemes']}")
    print("| recipe | bits/weight | slice | ppl (slice) | vs float | bound | ppl (test 16x512) "
          "| vs float | budget met on test |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {b['budget']} conf {b['confidence']:g} | {chosen['bits']:.3f} | {slice_} | "
          f"{chosen['metric']:.3f} | {chosen['delta'] * 100:+.2f}% | {bound} | "
          f"{q['perplexity']:.3f} | {test_delta * 100:+.2f}% | "
          f"{'yes' if test_delta <= limit and chosen['bits'] < W8_BITS else 'no'} |")  # fmt: skip
    print(f"float on test: {fp:.3f}; every candidate scored:")
    for e in b["tried"]:
        bd = f", bound {e['bound'] * 100:+.2f}%" if "bound" in e else ""
        print(f"  {e['label']}: {e['bits']:.3f} bits, {e['metric']:.3f} ({e['delta'] * 100:+.2f}%"
              f"{bd}), meets {e['meets']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main_())
