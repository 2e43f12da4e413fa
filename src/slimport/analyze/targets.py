"""The op inventory against what a target runs, with a verdict and its reasons.

* mindspore: slimport's own MindSpore runtime (runtime.mindspore.auto.REGISTRY: the model classes
  it implements, parity-tested) and, per ATen op, its equivalent in the INSTALLED mindspore.ops
  (op_table.json, checked with hasattr at run time);
* onnx: the ONNX op schemas of the installed `onnx` (onnx.defs) at slimport's export opset, and
  whether slimport's exporter (runtime.onnx) has a graph builder for the family;
* ascend: ascend_onnx_ops.json, a dated table of the ONNX ops Ascend's ATC converter parses
  (the route is ONNX -> ATC); a table, not a live check of an installed CANN.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from slimport.analyze.graph import OpUse
from slimport.arch.layout import is_causal_lm
from slimport.errors import SlimportError

TARGETS = ("mindspore", "onnx", "ascend")


@functools.cache
def _data(name: str) -> dict:
    return json.loads(resources.files("slimport.analyze").joinpath(name).read_text())


def op_table() -> dict[str, dict[str, list[str]]]:
    return _data("op_table.json")["ops"]


def ascend_table() -> dict:
    return _data("ascend_onnx_ops.json")


def _names(op: str, target: str) -> list[str] | None:
    """The `target` ("mindspore" or "onnx") ops computing ATen `op`; None when unmapped."""
    entry = op_table().get(op)
    return None if entry is None else entry[target]


def _where(use: OpUse) -> str:
    return ", ".join(use.paths)


def _task(config: dict) -> str:
    archs = config.get("architectures") or []
    if is_causal_lm(config):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "base"


def mindspore(uses: list[OpUse], config: dict) -> dict:
    from slimport.runtime.mindspore.auto import REGISTRY

    try:
        import mindspore.ops as msops
    except ImportError:
        msops = None
    rows, missing = [], []
    for u in uses:
        names = _names(u.op, "mindspore")
        if names is None:
            status = "unmapped"
        elif msops is None:
            status = "unknown (mindspore not installed)"
        else:
            status = "yes" if all(hasattr(msops, n) for n in names) else "no"
        if status in ("unmapped", "no"):
            missing.append(u)
        rows.append({"op": u.op, "count": u.count, "equivalent": "+".join(names or []) or "—",
                     "supported": status, "where": _where(u)})  # fmt: skip
    task, mt = _task(config), config.get("model_type")
    cls = REGISTRY.get(task, {}).get(mt)
    reasons = []
    if cls:
        reasons.append(f"slimport's MindSpore runtime implements {mt} ({task}) as {cls}")
    else:
        reasons.append(f"slimport's MindSpore runtime has no {task} model for model_type={mt!r}: a port is needed")  # fmt: skip
    if missing:
        reasons.append("no MindSpore equivalent for: " + ", ".join(f"{u.op} (at {_where(u)})" for u in missing))  # fmt: skip
    elif msops is not None:
        reasons.append(f"every ATen op has an equivalent in the installed mindspore {_version('mindspore')}")  # fmt: skip
    verdict = "supported" if cls and not missing else "portable" if not missing else "blocked"
    return {"target": "mindspore", "verdict": verdict, "reasons": reasons, "ops": rows}


@functools.cache
def _onnx_first_versions() -> dict[str, int]:
    import onnx.defs

    first: dict[str, int] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        if s.domain in ("", "ai.onnx"):
            first[s.name] = min(first.get(s.name, 1 << 30), s.since_version)
    return first


def _onnx_family(config: dict) -> tuple[str | None, set[str]]:
    from slimport.arch import family_for

    try:
        from slimport.runtime.onnx import decoder, encoder
    except ImportError:
        return None, set()
    try:
        family = family_for(config.get("model_type")).name
    except SlimportError:
        family = None
    return family, {*decoder.BUILDERS, *encoder.BUILDERS}


def onnx(uses: list[OpUse], config: dict) -> dict:
    try:
        first = _onnx_first_versions()
        from slimport.runtime.onnx.graph import OPSET
    except ImportError:
        raise SlimportError("--target onnx needs the onnx package", hint="pip install 'slimport[onnx]'") from None  # fmt: skip
    rows, missing, newer = [], [], []
    for u in uses:
        names = _names(u.op, "onnx")
        if names is None:
            status = "unmapped"
            missing.append(u)
        elif any(n not in first for n in names):
            status = "no"
            missing.append(u)
        else:
            need = max((first[n] for n in names), default=1)
            status = "yes" if need <= OPSET else f"opset {need}"
            if need > OPSET:
                newer.append((u, need))
        rows.append({"op": u.op, "count": u.count, "equivalent": "+".join(names or []) or "—",
                     "supported": status, "where": _where(u)})  # fmt: skip
    family, built = _onnx_family(config)
    reasons = []
    if family in built:
        reasons.append(f"slimport's exporter builds {family} graphs (opset {OPSET})")
    else:
        reasons.append(f"slimport's exporter has no graph builder for {family or config.get('model_type')!r} (it builds {', '.join(sorted(built))})")  # fmt: skip
    if missing:
        reasons.append("no ONNX op for: " + ", ".join(f"{u.op} (at {_where(u)})" for u in missing))  # fmt: skip
    for u, need in newer:
        reasons.append(f"{u.op} as one op needs opset {need} (> {OPSET}); at opset {OPSET} it is decomposed")  # fmt: skip
    verdict = (
        "supported" if family in built and not missing else "portable" if not missing else "blocked"
    )
    return {"target": "onnx", "verdict": verdict, "reasons": reasons, "ops": rows, "opset": OPSET}


def ascend(uses: list[OpUse], config: dict) -> dict:
    t = ascend_table()
    known, top = t["ops"], t["opsets"][1]
    rows, missing = [], []
    for u in uses:
        names = _names(u.op, "onnx")
        lacking = [n for n in (names or []) if known.get(n, 1 << 30) > top]
        status = (
            "unmapped" if names is None else "yes" if not lacking else "no: " + ", ".join(lacking)
        )
        if names is None or lacking:
            missing.append((u, lacking))
        rows.append({"op": u.op, "count": u.count, "equivalent": "+".join(names or []) or "—",
                     "supported": status, "where": _where(u)})  # fmt: skip
    reasons = [
        f"route: ONNX -> ATC; table of ATC's ONNX parsers (opsets {t['opsets'][0]}-{top}) from "
        f"{t['source']} at commit {t['commit'][:10]} ({t['dated']}): a table, not a live check"
    ]
    for u, lacking in missing:
        what = ", ".join(lacking) if lacking else "no ONNX mapping"
        reasons.append(f"{u.op} -> {what}: not in the table (decompose it or write a custom op; at {_where(u)})")  # fmt: skip
    verdict = "convertible (per table)" if not missing else "needs custom ops or decomposition"
    return {"target": "ascend", "verdict": verdict, "reasons": reasons, "ops": rows}


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


CHECKS = {"mindspore": mindspore, "onnx": onnx, "ascend": ascend}
