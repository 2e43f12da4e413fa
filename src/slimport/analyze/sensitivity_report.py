"""`slimport sensitivity --report FILE.html`: the ranking, per-layer costs, weight histograms of
the most and least sensitive modules (fp32 vs quantized) and the budget search's Pareto plot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from slimport.analyze.sensitivity import Probe
from slimport.report import Figure, Report, Table
from slimport.report.plots import bars, histograms, pareto

KIND_COLORS = {"q_proj": "C0", "k_proj": "C1", "v_proj": "C2", "o_proj": "C3", "gate_proj": "C4",
               "up_proj": "C5", "down_proj": "C6"}  # fmt: skip


def _fmt(result: dict):
    if result["metric"] == "perplexity":
        return "perplexity increase (%)", lambda d: d * 100
    return "accuracy change (points)", lambda d: d


def document(result: dict, probe: Probe | None = None, top: int = 25) -> Report:
    label, scale = _fmt(result)
    settings = {
        "model": result["model"],
        "scheme per module": f"{result['scheme']} {result['method'].upper()}",
        "held-out slice": ", ".join(f"{k} {v}" for k, v in result["eval"].items()),
        f"float {result['metric']}": f"{result['baseline']:.5g}",
        "evaluations": "Ray " + result["ray"] if result["ray"] else "serial",
        "seconds": result["seconds"],
    }
    doc = Report("slimport sensitivity", settings)
    rows = result["modules"]
    shown = rows[:top]
    colors = [KIND_COLORS.get(r["module"].rsplit(".", 1)[-1], "C7") for r in shown]
    doc.add("Sensitivity ranking", Figure(
        bars([r["module"] for r in shown], [scale(r["delta"]) for r in shown], label,
             f"each module alone at {result['scheme']}, most costly {len(shown)}", colors),
        f"the {len(shown)} most sensitive of {len(rows)} Linears", "ranking"))  # fmt: skip
    layers = _per_layer(rows, scale)
    if layers:
        names = sorted(layers)
        mean = [sum(layers[i]) / len(layers[i]) for i in names]
        spread = [max(layers[i]) - min(layers[i]) for i in names]
        doc.add("Per layer", Figure(
            bars([f"block {i}" for i in names], mean, label + ", mean over the block's Linears",
                 "per-block cost (error bar: spread of the block's Linears)", errors=spread),
            "mean one-module cost per block, bars spanning min to max", "layers"))  # fmt: skip
    doc.add("", Table(
        ["rank", "module", label, "weight rel. err", "output rel. err", "params"],
        [[i + 1, r["module"], scale(r["delta"]), r["weight_rel_err"], r.get("output_rel_err", "-"),
          r["params"]] for i, r in enumerate(shown)],
        f"most costly {len(shown)} of {len(rows)} (all in --json)"))  # fmt: skip
    if probe is not None and rows:
        picks = [rows[0]["module"], rows[-1]["module"]]
        asked = probe.config.weights

        def weights(unit: str, of) -> np.ndarray:  # a block's panel: all of its Linears
            return np.concatenate([of(n).flatten().numpy() for n in probe.units[unit]])

        panels = {
            f"{u} ({'most' if i == 0 else 'least'} sensitive)": {
                "fp32": weights(u, probe.originals.__getitem__),
                result["scheme"]: weights(u, lambda n: probe.quantized(n, asked)),
            }
            for i, u in enumerate(picks)
        }
        doc.add("Weights", Figure(histograms(panels, "weight value"),
                                  "weight distributions, fp32 vs quantized", "weights"))  # fmt: skip
    if "budget" in result:
        _budget(doc, result, scale, label)
    return doc


def _per_layer(rows: list[dict], scale) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in rows:
        m = re.search(r"\.(\d+)(\.|$)", r["module"])  # a Linear in a block, or a block
        if m:
            out.setdefault(int(m.group(1)), []).append(scale(r["delta"]))
    return out


def _budget(doc: Report, result: dict, scale, label: str) -> None:
    b = result["budget"]
    chosen, tried = b["chosen"], b["tried"]
    metric = result["metric"]
    base = (b.get("scored_on") or {}).get("float", result["baseline"])  # the candidates' slice
    limit = None
    if b["budget"].startswith("ppl"):
        limit = base * (1 + float(b["budget"].split("+")[1].rstrip("%")) / 100)
    elif b["budget"].startswith("accuracy"):
        limit = base + float(b["budget"].split(">=")[1].rstrip("pt")) / 100
    y = (lambda e: e["metric"]) if metric == "perplexity" else (lambda e: -e["metric"])
    svg = pareto([(e["bits"], y(e), e["label"]) for e in tried], "average bits per weight",
                 metric if metric == "perplexity" else "- accuracy", (chosen["bits"], y(chosen)),
                 limit if metric == "perplexity" else (None if limit is None else -limit),
                 f"budget {b['budget']}: every recipe scored")  # fmt: skip
    doc.add(f"Budget search ({b['budget']})", Figure(svg, "size / quality of every recipe the search scored", "pareto"))  # fmt: skip
    doc.add("", f"chosen: {chosen['bits']:.3f} bits/weight, {metric} {chosen['metric']:.5g} "
            f"({label} {scale(chosen['delta']):+.3f}), schemes {chosen['schemes']}; recipe {b['recipe']}")  # fmt: skip
    bound = [f"{b['confidence']:g} bound"] if any("bound" in e for e in tried) else []
    doc.add("", Table(["recipe", "bits/weight", metric, label, *bound, "meets", "schemes"],
                      [[e["label"], e["bits"], e["metric"], scale(e["delta"]),
                        *([scale(e["bound"])] if bound else []), e["meets"],
                        ", ".join(f"{k}: {v}" for k, v in e["schemes"].items())] for e in tried],
                      "every recipe scored, in order"))  # fmt: skip


def save_report(result: dict, probe: Probe | None, path: str | Path) -> list[Path]:
    return document(result, probe).save(path)
