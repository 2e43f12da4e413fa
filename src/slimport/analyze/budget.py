"""`--budget`: per-module weight schemes for the smallest model that meets a budget.

The search, in three steps:

1. start: every module at the widest quantized rung of the ladder (W8 per channel). Scored for
   real; if it misses a quality budget, the modules W8 costs most (one-module measurements) go
   back to float, as few as bisection finds enough.
2. order: every step down the ladder (W8 -> W4 g128 -> W4 g64 ...) of every module, cheapest
   first by (one-module cost) / (bits saved); the plans P_0 (start) ... P_K (every step taken)
   shrink monotonically.
3. pick: for a bits budget, the first P_k small enough; for a quality budget, bisection over k for
   the last P_k that meets it, starting where the sum of the one-module costs says, each
   candidate quantized by the real pipeline (`pipeline.quantize_` with the candidate's recipe:
   error propagation, GPTQ, AWQ as `slimport quantize` runs them) and scored on the held-out slice.

A perplexity budget is met on a margin (margin.py): the upper `confidence` bound of the
candidate's increase over the slice's windows, not the slice's mean alone, must be within it. With
`check_windows` (Setup), candidates are scored on windows the one-module costs never saw: the
order was chosen to look cheap on the cost windows, so a plan scored there reads optimistic.

Every candidate scored is kept (the Pareto plot). The answer is a recipe: the commonest scheme as
the recipe's own, the others as per-module `overrides`, float modules in `protect`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from slimport.analyze import margin
from slimport.analyze.sensitivity import Probe, scheme_label
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.errors import SlimportError

_BUDGET = re.compile(
    r"^\s*(ppl|perplexity|accuracy|acc|bits)\s*(<=|>=)\s*([+-]?\d+(?:\.\d*)?)\s*(%|pt)?\s*$", re.I
)
EXAMPLES = '"ppl<=+5%", "accuracy>=-0.5pt", "bits<=4.5"'


@dataclass(frozen=True)
class Budget:
    kind: str  # ppl | accuracy | bits
    limit: float  # ppl: max relative increase (0.05); accuracy: min change in points; bits: max

    def met(self, delta: float, bits: float) -> bool:
        if self.kind == "bits":
            return bits <= self.limit + 1e-9
        if self.kind == "ppl":
            return delta <= self.limit + 1e-12
        return delta >= self.limit - 1e-12

    def __str__(self) -> str:
        if self.kind == "ppl":
            return f"ppl<=+{self.limit * 100:g}%"
        return (
            f"accuracy>={self.limit:+g}pt" if self.kind == "accuracy" else f"bits<={self.limit:g}"
        )


def parse_budget(text: str, causal: bool | None = None) -> Budget:
    """'ppl<=+5%' (perplexity at most 5% above float's), 'accuracy>=-0.5pt' (at most half a point
    lost), 'bits<=4.5' (average stored bits per weight of the searched Linears)."""
    m = _BUDGET.match(text or "")

    def bad(why: str):
        raise SlimportError(f"--budget {text!r}: {why}", hint=f"budgets look like {EXAMPLES}")

    if not m:
        bad("does not parse")
    name, op, value, unit = m.group(1).lower(), m.group(2), float(m.group(3)), m.group(4)
    kind = {"perplexity": "ppl", "acc": "accuracy"}.get(name, name)
    if kind == "ppl":
        if op != "<=" or unit != "%" or value < 0:
            bad("a perplexity budget is an increase that may not be passed: ppl<=+N%")
        limit = value / 100
    elif kind == "accuracy":
        if op != ">=" or unit not in (None, "pt") or value > 0:
            bad("an accuracy budget is a loss in points that may not be passed: accuracy>=-Npt")
        limit = value
    else:
        if op != "<=" or unit is not None or value <= 0:
            bad("a size budget is an average of bits per weight: bits<=N")
        limit = value
    if causal is not None and kind != "bits" and (kind == "ppl") != causal:
        bad(f"the model is {'a causal LM (use ppl)' if causal else 'a classifier (use accuracy)'}")
    return Budget(kind, limit)


def ladder(bits: int, group_sizes: list[int]) -> list[QuantArgs]:
    """The quantized rungs, widest first: W8 per channel, then W{bits} groups, coarse to fine
    (fewer bits first: a coarser group stores fewer scales)."""
    rungs = [QuantArgs(8, True, "channel", None)]
    for g in sorted(set(group_sizes), reverse=True):
        rungs.append(QuantArgs(bits, bits >= 8, "group", g))
    if not group_sizes:
        rungs.append(QuantArgs(bits, bits >= 8, "channel", None))
    return rungs


Plan = dict  # module name -> QuantArgs, or None (float)


@dataclass
class Search:
    probe: Probe
    budget: Budget
    rungs: list[QuantArgs]
    measure: object  # jobs -> rows (serial or Ray; workers.py)
    confidence: float = 0.0  # ppl budgets: met on this upper confidence bound (0: the mean)
    tried: list[dict] = field(default_factory=list)
    costs: dict = field(default_factory=dict)  # (module, scheme label) -> one-module delta

    def bits(self, plan: Plan) -> float:
        """Average stored bits per weight of the plan's (unit -> scheme) Linears."""
        p = self.probe
        total = sum(p.originals[n].numel() for n in p.expand(plan))
        return sum(p.size_bits(u, a) for u, a in plan.items()) / total

    def cost(self, rows: list[dict]) -> None:
        for r in rows:
            self.costs[(r["module"], r["scheme"])] = r["delta"]

    def score(self, plan: Plan, label: str) -> dict:
        """Quantize the float model with the plan's recipe (the real pipeline) and score it."""
        from slimport.compress import pipeline

        p = self.probe
        config = recipe_config(p, p.expand(plan))
        model = copy.deepcopy(p.model)
        calib = p.calibration() if config.needs_calibration else None
        pipeline.quantize_(model, config, calib)
        entry = {"label": label, "bits": self.bits(plan)}
        if p.causal:  # on the check windows when there are some
            nlls, base = p.window_nlls(model, check=True), p.float_nlls(check=True)
            value = math.exp(sum(nlls) / len(nlls))
            entry |= {"metric": value, "delta": value / math.exp(sum(base) / len(base)) - 1.0}
            if self.confidence and self.budget.kind == "ppl":
                entry["bound"] = margin.relative_increase(nlls, base, self.confidence)
        else:
            value = p.score(model)
            entry |= {"metric": value, "delta": p.delta(value)}
        del model
        entry |= {"float": sum(a is None for a in plan.values()), "schemes": _census(plan)}
        entry["meets"] = self.budget.met(entry.get("bound", entry["delta"]), entry["bits"])
        self.tried.append(entry)
        return entry


def search(
    probe: Probe, budget: Budget, rungs: list[QuantArgs], measure, confidence: float = 0.0
) -> tuple[Plan, dict, Search]:
    """The plan meeting `budget` with the fewest bits found (see the module doc), its scored
    entry and the search (every candidate in `.tried`). Raises when no plan meets it.
    `confidence`: a ppl budget is met on that upper bound of the increase (margin.py)."""
    s = Search(probe, budget, rungs, measure, confidence)
    names = list(probe.units)
    top = rungs[0]
    start: Plan = dict.fromkeys(names, top)
    best = s.score(start, f"uniform {scheme_label(top)}")
    if budget.kind != "bits" and not best["meets"]:
        start, best = _back_to_float(s, names, top, best)
    # every step down the ladder, cheapest per saved bit first
    rows = measure([(n, r) for r in rungs[1:] for n in names])
    s.cost(rows)
    steps = []
    for n in names:
        if start[n] is None:
            continue
        prev = top
        for r in rungs[1:]:
            saved = probe.size_bits(n, prev) - probe.size_bits(n, r)
            harm = s.costs[(n, scheme_label(r))] - s.costs.get((n, scheme_label(prev)), 0.0)
            harm = harm if budget.kind != "accuracy" else -harm
            steps.append((max(harm, 0.0) / saved, n, r, harm))
            prev = r
    steps.sort(key=lambda t: (t[0], t[1]))
    # a module's steps in ladder order: a later rung replaces an earlier one
    plans, predicted, plan, total = [start], [0.0], dict(start), 0.0
    for _, n, r, harm in steps:
        if s.rungs.index(r) <= s.rungs.index(plan[n]):
            continue
        plan = {**plan, n: r}
        total += harm
        plans.append(plan)
        predicted.append(total)
    last = s.score(plans[-1], f"every module {scheme_label(rungs[-1])}") if len(plans) > 1 else best
    if budget.kind == "bits":
        k = next((i for i, p in enumerate(plans) if s.bits(p) <= budget.limit + 1e-9), None)
        if k is None:
            raise _unmet(budget, plans[-1], last, s)
        entry = (
            last
            if k == len(plans) - 1
            else s.score(plans[k], f"first plan under {budget.limit} bits")
        )
        return plans[k], entry, s
    if last["meets"]:
        return plans[-1], last, s
    if not best["meets"]:
        raise _unmet(budget, start, best, s)
    # bisection: plans[lo] meets, plans[hi] does not; the first probe where the prediction says
    lo, hi, good = 0, len(plans) - 1, best
    limit = budget.limit if budget.kind == "ppl" else -budget.limit
    guess = max((i for i, c in enumerate(predicted) if c <= limit), default=0)
    mid = min(max(guess, lo + 1), hi - 1)
    while hi - lo > 1:
        e = s.score(plans[mid], f"candidate {mid}/{len(plans) - 1}")
        if e["meets"]:
            lo, good = mid, e
        else:
            hi = mid
        mid = (lo + hi) // 2
    return plans[lo], good, s


def _back_to_float(s: Search, names, top, best):
    """Uniform W8 misses the budget: the modules W8 costs most go float, as few as needed."""
    rows = s.measure([(n, top) for n in names])
    s.cost(rows)
    sign = -1 if s.budget.kind == "accuracy" else 1
    order = sorted(names, key=lambda n: -sign * s.costs[(n, scheme_label(top))])
    lo, hi = 0, len(order)  # hi float modules: float model, meets by construction
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan = {n: (None if n in order[:mid] else top) for n in names}
        e = s.score(plan, f"{mid} modules float")
        if e["meets"]:
            hi, best = mid, e
        else:
            lo = mid
    plan = {n: (None if n in order[:hi] else top) for n in names}
    if not best["meets"]:
        best = s.score(plan, f"{hi} modules float")
    return plan, best


def _unmet(budget: Budget, plan: Plan, entry: dict, s: Search) -> SlimportError:
    err = SlimportError(
        f"--budget {budget}: not met by any recipe tried; the closest is {entry['label']} "
        f"({entry['bits']:.3f} bits/weight, {s.probe.metric} {entry['metric']:.4g}, "
        f"{_fmt_delta(s.probe, entry['delta'])}"
        + (
            f", {s.confidence:g} bound {_fmt_delta(s.probe, entry['bound'])}"
            if "bound" in entry
            else ""
        )
        + ")",
        hint="loosen the budget, or add rungs (--group-sizes, float modules)",
    )
    err.closest = plan  # the caller writes it beside the recipe
    return err


def _fmt_delta(probe: Probe, delta: float) -> str:
    return f"{delta * 100:+.2f}%" if probe.causal else f"{delta:+.2f}pt"


def _census(plan: Plan) -> dict:
    out: dict[str, int] = {}
    for a in plan.values():
        out[scheme_label(a)] = out.get(scheme_label(a), 0) + 1
    return out


def recipe_dict(probe: Probe, plan: Plan) -> dict:
    """The plan as a recipe mapping: the commonest quantized scheme as the recipe's own, every
    other module's in `overrides` (exact names), float modules added to `protect`."""
    config = probe.config
    quantized = [a for a in plan.values() if a is not None]
    base = max(set(quantized), key=lambda a: (quantized.count(a), -a.bits)) if quantized else None
    d: dict = {"bits": base.bits if base else config.bits, "method": config.method}
    if base is not None and base.granularity == "group":
        d["group_size"] = base.group_size
    else:
        d["granularity"] = base.granularity if base else "channel"
    if base is not None:
        d["symmetric"] = base.symmetric
    floats = sorted(n for n, a in plan.items() if a is None)
    d["protect"] = list(config.protect) + [f"^{re.escape(n)}$" for n in floats]
    overrides = {}
    for n, a in plan.items():
        if a is not None and a != base:
            o = {"bits": a.bits, "symmetric": a.symmetric}
            o |= (
                {"group_size": a.group_size}
                if a.granularity == "group"
                else {"granularity": a.granularity}
            )
            overrides[f"^{re.escape(n)}$"] = o
    if overrides:
        d["overrides"] = overrides
    for k in ("calib_data", "num_samples", "seq_len", "seed"):
        if k != "calib_data" or config.calib_data:
            d[k] = getattr(config, k)
    return d


def recipe_config(probe: Probe, plan: Plan) -> QuantizationConfig:
    return QuantizationConfig.from_dict(recipe_dict(probe, plan))


def write_recipe(path: str | Path, probe: Probe, plan: Plan, note: str) -> Path:
    import yaml

    from slimport.io.base import atomic_path

    path = Path(path)
    text = "".join(f"# {line}\n" for line in note.splitlines())
    text += yaml.safe_dump({"quantization": recipe_dict(probe, plan)}, sort_keys=False, width=120)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
