"""`slimport sensitivity` as a function: the ranking, the optional budget search and its recipe,
and the HTML/Markdown report of both."""

from __future__ import annotations

import time
from pathlib import Path

from slimport.analyze import budget as B
from slimport.analyze import margin, workers
from slimport.analyze.sensitivity import Probe, Setup, rank, scheme_label
from slimport.compress.quant.config import QuantArgs
from slimport.errors import SlimportError


def run(
    setup: Setup,
    budget: str | None = None,
    recipe: str | Path | None = None,
    group_sizes: list[int] | None = None,
    ray: str | None = None,
    ray_workers: int = 2,
    progress=None,
    probe: Probe | None = None,
    confidence: float | None = None,
) -> dict:
    """Rank every searchable Linear by the cost of quantizing it alone (setup's scheme); with
    `budget`, search per-module schemes and write the recipe to `recipe`. `ray`: None = serial,
    else workers.LOCAL or a cluster address. `probe`: one already built for `setup`.
    `confidence`: a ppl budget is met on that upper bound over the windows (margin.py; default
    margin.DEFAULT_CONFIDENCE, 0: the slice's mean)."""
    t0 = time.perf_counter()
    parsed = B.parse_budget(budget) if budget else None  # refused before any model is loaded
    if parsed and recipe is None:
        raise SlimportError("--budget writes a recipe: give --recipe-out FILE.yaml")
    confidence = _confidence(parsed, confidence, setup)
    if ray is not None:
        workers.connect(ray, ray_workers)  # an unreachable cluster fails before the work
    probe = probe or Probe(setup)
    if parsed:
        B.parse_budget(budget, probe.causal)
    rows: dict[tuple[str, str], dict] = {}

    def measure(jobs: list[tuple[str, QuantArgs]]) -> list[dict]:
        todo = [j for j in jobs if (j[0], scheme_label(j[1])) not in rows]
        if ray is None:
            done = workers.measure_serial(probe, todo, progress)
        else:
            done = workers.measure_ray(setup, todo, ray, ray_workers, progress)
        for r in done:
            rows[(r["module"], r["scheme"])] = r
        return [rows[(n, scheme_label(a))] for n, a in jobs]

    asked = probe.config.weights
    ranking = rank(measure([(n, asked) for n in probe.units]), probe.causal)
    result = {
        "model": setup.model,
        "metric": probe.metric,
        "baseline": probe.baseline,
        "scheme": scheme_label(asked),
        "method": setup.method,
        "unit": setup.unit,
        "eval": {"data": setup.eval_data, "windows": setup.windows, "seq_len": setup.seq_len}
        if probe.causal
        else {"data": setup.eval_data, "examples": len(probe.labels)},
        "ray": ray,
        "modules": ranking,
    }
    if parsed:
        rungs = B.ladder(
            setup.bits, group_sizes or ([setup.group_size] if setup.group_size else [])
        )
        try:
            plan, entry, search = B.search(probe, parsed, rungs, measure, confidence)
        except SlimportError as e:
            closest = getattr(e, "closest", None)
            if closest is not None:
                near = Path(f"{Path(recipe).with_suffix('')}.closest.yaml")
                B.write_recipe(near, probe, probe.expand(closest),
                               f"closest recipe found for --budget {budget}")  # fmt: skip
                raise SlimportError(f"{e.message}; written to {near}", hint=e.hint) from None
            raise
        note = (f"slimport sensitivity --budget {budget!r} ({setup.method}): {entry['bits']:.3f} "
                f"bits/weight, {probe.metric} {entry['metric']:.4g} "
                f"({_fmt(probe.causal, entry['delta'])} vs float)"
                + (f" ({confidence:g} upper bound {_fmt(True, entry['bound'])})"
                   if "bound" in entry else ""))  # fmt: skip
        path = B.write_recipe(recipe, probe, probe.expand(plan), note)
        result["budget"] = {
            "budget": str(parsed),
            "confidence": confidence,
            "scored_on": {
                "windows": setup.check_windows or setup.windows,
                "check": bool(setup.check_windows),
                "float": probe.float_metric(check=True),
            }
            if probe.causal
            else None,
            "recipe": str(path),
            "chosen": entry,
            "plan": {n: scheme_label(a) for n, a in probe.expand(plan).items()},
            "tried": search.tried,
            "rungs": [scheme_label(r) for r in rungs],
        }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["_probe"] = probe  # for the report's weight histograms; not in the JSON
    return result


def _confidence(budget: B.Budget | None, confidence: float | None, setup: Setup) -> float:
    """The margin the search uses: on by default for ppl budgets, refused where meaningless."""
    if budget is None or budget.kind != "ppl":
        if confidence:
            raise SlimportError(f"--confidence {confidence}: a margin for ppl budgets only",
                                hint="leave --confidence out, or give --budget \"ppl<=+N%\"")  # fmt: skip
        return 0.0
    confidence = margin.DEFAULT_CONFIDENCE if confidence is None else confidence
    margin.check_confidence(confidence, setup.check_windows or setup.windows)
    return confidence


def _fmt(causal: bool, d: float) -> str:
    return f"{d * 100:+.3f}%" if causal else f"{d:+.2f}pt"


def summary(result: dict, top: int = 10) -> str:
    causal = result["metric"] == "perplexity"
    fmt = (lambda d: f"{d * 100:+.3f}%") if causal else (lambda d: f"{d:+.2f}pt")
    lines = [
        f"{result['metric']} float {result['baseline']:.4g}; each Linear alone at "
        f"{result['scheme']} {result['method'].upper()}, most costly first:",
        "| module | delta | weight rel. err | output rel. err |",
        "|---|---|---|---|",
    ]
    for r in result["modules"][:top]:
        oe = f"{r['output_rel_err']:.3g}" if "output_rel_err" in r else "-"
        lines.append(f"| {r['module']} | {fmt(r['delta'])} | {r['weight_rel_err']:.4f} | {oe} |")
    lines.append(f"({min(top, len(result['modules']))} of {len(result['modules'])})")
    if "budget" in result:
        b, c = result["budget"], result["budget"]["chosen"]
        bound = f", {b['confidence']:g} bound {fmt(c['bound'])}" if "bound" in c else ""
        lines.append(
            f"budget {b['budget']}: {c['bits']:.3f} bits/weight, {result['metric']} "
            f"{c['metric']:.4g} ({fmt(c['delta'])}{bound}), {c['schemes']}; "
            f"{len(b['tried'])} recipes scored; wrote {b['recipe']}"
        )
    lines.append(f"{result['seconds']:.1f} s")
    return "\n".join(lines)
