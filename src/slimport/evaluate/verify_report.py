"""`slimport verify --report FILE.html`: the verify report as HTML (+ Markdown) with plots of
the per-layer and per-tensor parity."""

from __future__ import annotations

from pathlib import Path

from slimport.evaluate.verify import criterion
from slimport.report import Figure, Report, Table
from slimport.report.plots import series


def document(report: dict) -> Report:
    doc = Report(
        f"slimport verify: {'PASSED' if report['passed'] else 'FAILED'} ({criterion(report)})",
        {
            "reference": f"{report['reference']} on {report['source']}",
            "candidate": f"{report['candidate']} on {report['target']}",
            "inputs": f"{report['inputs']['tokens']} tokens, {report['inputs']['how']}",
        },  # fmt: skip
    )
    for note in report["notes"]:
        doc.add("", f"note: {note}")
    o = report["output"]
    doc.add("End to end", Table(["output", "max abs Δ", "max rel Δ", "cosine", "top-1 agreement"],
                                [[o["name"], o["max_abs"], o["max_rel"], o["cosine"], o["top1_agreement"]]]))  # fmt: skip
    layers = report["layers"]
    if layers:
        x = ["emb" if r["layer"] == 0 else str(r["layer"]) for r in layers]
        svg = series(x, {"max |Δ| of the hidden state": [r["max_abs"] for r in layers]},
                     "after block", "max |Δ|", log_y=True, threshold=report["criterion"]["atol"])  # fmt: skip
        doc.add("Per layer", Figure(svg, "max |Δ| of the hidden state after each block", "layers"))
        doc.add("", Table(["layer", "max abs Δ"], [[a, r["max_abs"]] for a, r in zip(x, layers, strict=True)]))  # fmt: skip
    tensors = sorted(report["tensors"].items(), key=lambda kv: -kv[1]["max_abs"])
    if tensors:
        svg = series(range(len(tensors)), {"max |Δ|": [s["max_abs"] for _, s in tensors]},
                     "tensor (sorted, worst first)", "max |Δ|", log_y=True, threshold=report["criterion"]["atol"])  # fmt: skip
        doc.add("Per tensor", Figure(svg, f"max |Δ| of each of {len(tensors)} tensors", "tensors"))
        doc.add("", Table(["tensor", "max abs Δ", "L2 of Δ"], [[n, s["max_abs"], s["l2"]] for n, s in tensors[:20]], "worst 20"))  # fmt: skip
    doc.add("Pass criterion", Table(["measure", "value", "limit", ""], [[c["measure"], c["value"], c["limit"], "pass" if c["passed"] else "FAIL"] for c in report["checks"]]))  # fmt: skip
    if "greedy" in report:
        g = report["greedy"]
        first = g["first_difference"]
        doc.add("Greedy decoding", f"{len(g['reference'])} tokens, " + ("identical" if first is None else f"first difference at token {first}"))  # fmt: skip
    return doc


def save_report(report: dict, path: str | Path) -> list[Path]:
    return document(report).save(path)
