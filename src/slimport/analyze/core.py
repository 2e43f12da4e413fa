"""`analyze(MODEL)`: the op inventory of the model's real forward against each target, and its
memory for inference and training, as a dict; `markdown` and `report` render it."""

from __future__ import annotations

from pathlib import Path

import torch

from slimport.analyze import pipeline_memory, targets
from slimport.analyze.graph import hf_config, meta_model, op_inventory
from slimport.analyze.memory import PIN_MMAP_THRESHOLD, estimate
from slimport.arch import family_for
from slimport.errors import SlimportError


def _config(model) -> object:
    """A transformers config from a checkpoint path, a config.json dict or a config object."""
    if isinstance(model, (str, Path)):
        from slimport.convert.loader import model_config
        from slimport.io import open_checkpoint

        with open_checkpoint(model) as ckpt:
            config = model_config(ckpt)
        if not config:
            raise SlimportError(f"{model}: no model config found", hint="put config.json beside the weights")  # fmt: skip
        return hf_config(config)
    return hf_config(model) if isinstance(model, dict) else model


def analyze(
    model,
    target: str | None = None,
    batch: int = 1,
    seq: int = 128,
    num_samples: int = 64,
    seq_len: int = 512,
    baseline: bool = False,
) -> dict:
    """Op inventory, per-target verdicts (all targets unless `target`) and memory estimates of
    `model` (a checkpoint path, a config.json dict or a transformers config) at batch x seq;
    slimport's own convert / quantize peaks with `num_samples` x `seq_len` calibration tokens,
    plus the measured import baseline of a fresh process when `baseline`."""
    if target is not None and target not in targets.TARGETS:
        raise SlimportError(f"unknown --target {target!r}", hint="one of " + ", ".join(targets.TARGETS))  # fmt: skip
    if batch < 1 or seq < 1:
        raise SlimportError(f"--batch {batch} --seq {seq}: both must be positive integers")
    if num_samples < 1 or seq_len < 1:
        raise SlimportError(f"--num-samples {num_samples} --seq-len {seq_len}: both must be positive integers")  # fmt: skip
    config = _config(model)
    family = family_for(config.model_type).name
    module = meta_model(config)
    uses = op_inventory(module, batch=min(batch, 2), seq=min(seq, 16))  # the graph's ops, not sizes
    cfg = {"model_type": config.model_type, "architectures": config.architectures or [type(module).__name__]}  # fmt: skip
    chosen = [target] if target else list(targets.TARGETS)
    return {
        "model": str(model) if isinstance(model, (str, Path)) else type(module).__name__,
        "model_type": config.model_type,
        "family": family,
        "class": type(module).__name__,
        "ops": [
            {"op": u.op, "count": u.count, "modules": dict(u.modules), "where": u.paths}
            for u in uses
        ],  # fmt: skip
        "targets": {t: targets.CHECKS[t](uses, cfg) for t in chosen},
        "memory": estimate(module, family, batch, seq),
        "pipelines": _pipelines(module, family, config, num_samples, seq_len, baseline),
    }


def _pipelines(module, family, config, num_samples, seq_len, baseline) -> dict:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = pipeline_memory.estimate(module, family, dtype.itemsize, num_samples, seq_len)
    arch = (config.architectures or [type(module).__name__])[0]
    out["baseline"] = pipeline_memory.import_baseline(arch) if baseline else None
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def tables(result: dict) -> list[tuple[str, list[str], list[list]]]:
    """(heading, columns, rows) of every table of the analysis, shared by Markdown and HTML."""
    m = result["memory"]
    w = m["weights"]
    out = [
        (
            "Op inventory (ATen ops of the exported forward)",
            ["op", "count", "modules", "e.g. at"],
            [
                [
                    o["op"],
                    o["count"],
                    ", ".join(f"{k}×{v}" for k, v in o["modules"].items()),
                    ", ".join(o["where"]),
                ]
                for o in result["ops"]
            ],
        ),  # fmt: skip
        (
            f"Weights ({w['parameters']:,} parameters, {w['quantized_parameters']:,} in quantizable Linears)",
            ["storage", "MiB", "bytes"],
            [[k, _mib(v), v] for k, v in w["bytes"].items()],
        ),  # fmt: skip
        (
            "KV cache per token (all layers)",
            ["dtype", "bytes"],
            [[k, v] for k, v in m["kv_cache_per_token"].items()],
        ),  # fmt: skip
        (
            f"Inference at batch {m['batch']} x seq {m['seq']} (MiB)",
            [
                "dtype",
                "weights",
                "activations (peak)",
                "KV cache",
                "kernels + allocator",
                "total",
                f"total with {PIN_MMAP_THRESHOLD}",
            ],  # fmt: skip
            [
                [
                    d,
                    *(
                        _mib(r[k])
                        for k in (
                            "weights",
                            "activations",
                            "kv_cache",
                            "runtime",
                            "total",
                            "pinned",
                        )
                    ),
                ]
                for d, r in m["inference"].items()
            ],
        ),  # fmt: skip
        (
            f"Training at batch {m['batch']} x seq {m['seq']}, fp32 + AdamW (MiB; estimate)",
            ["setup", "weights", "gradients", "optimizer", "activations", "total"],
            [
                [
                    s,
                    *(
                        _mib(r[k])
                        for k in ("weights", "gradients", "optimizer", "activations", "total")
                    ),
                ]
                for s, r in m["training"].items()
            ],
        ),  # fmt: skip
    ]
    if "pipelines" in result:
        out.append(_pipeline_table(result["pipelines"]))
    for name, t in result["targets"].items():
        out.append((f"Target {name}: {t['verdict']}", ["ATen op", "count", "equivalent", "supported", "e.g. at"],
                    [[r["op"], r["count"], r["equivalent"], r["supported"], r["where"]] for r in t["ops"]]))  # fmt: skip
    return out


def _pipeline_table(p: dict) -> tuple[str, list[str], list[list]]:
    base = p.get("baseline")
    rows = [["process baseline (imports)", "measured" if base else "not measured (--baseline)",
             _mib(base) if base else "", "", ""]]  # fmt: skip
    c = p["convert"]
    rows.append(["slimport convert peak (--to hf)", "per tensor", _mib(c["total"]),
                 _mib(c["total"] + base) if base else "",
                 "; ".join(f"{k} {_mib(v)}" for k, v in c.items() if k != "total")])  # fmt: skip
    for m, q in p["quantize"].items():
        terms = {**q["terms"], "kernels + allocator": q["kernels + allocator"]}
        rows.append([f"slimport quantize peak ({m}, calib {q['calibration']})", f"{q['stage']} stage",
                     _mib(q["total"]), _mib(q["total"] + base) if base else "",
                     "; ".join(f"{k} {_mib(v)}" for k, v in terms.items())])  # fmt: skip
    if p.get("quantize_unsupported"):
        rows.append(["slimport quantize peak", "", "", "", p["quantize_unsupported"]])
    heading = "slimport's own pipelines: peak RSS (MiB; estimate above the import baseline). " + "; ".join(p["assumptions"][1:])  # fmt: skip
    return (
        heading,
        ["pipeline", "high point", "above baseline", "with baseline", "terms (MiB)"],
        rows,
    )


def markdown(result: dict) -> str:
    """The analysis as Markdown tables (no plots: those need matplotlib and go to --report)."""
    return _document(result, figures=False).markdown()


def _document(result: dict, figures: bool = True):
    from slimport.report import Figure, Report, Table

    doc = Report(
        f"slimport analyze: {result['model']}",
        {
            "class": result["class"],
            "family": result["family"],
            "model_type": result["model_type"],
            "batch x seq": f"{result['memory']['batch']} x {result['memory']['seq']}",
        },  # fmt: skip
    )
    doc.add("Verdicts", Table(["target", "verdict", "reasons"],
                              [[n, t["verdict"], "; ".join(t["reasons"])] for n, t in result["targets"].items()]))  # fmt: skip
    for heading, columns, rows in tables(result):
        doc.add(heading, Table(columns, rows))
    if figures:
        from slimport.report.plots import stacked_bars

        m = result["memory"]
        setups = {f"infer {d}": r for d, r in m["inference"].items()} | m["training"]
        keys = ("weights", "gradients", "optimizer", "activations", "kv_cache", "runtime")
        stacks = {k: [r.get(k, 0) / 2**20 for r in setups.values()] for k in keys}
        doc.add("Memory breakdown", Figure(stacked_bars(list(setups), stacks, "MiB"), "memory per setup (MiB)", "memory"))  # fmt: skip
    return doc


def report(result: dict, path: str | Path) -> list[Path]:
    """Write the analysis as PATH (self-contained HTML with the memory plot) + its Markdown."""
    return _document(result).save(path)
