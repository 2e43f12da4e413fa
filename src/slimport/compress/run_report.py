"""`slimport quantize|prune --report FILE.html`: the run's settings, per-layer errors and, for
chosen layers, the weight distributions and the output-activation distributions, fp32 (the
source) against what the output folder holds (its integers decoded by compressed-tensors' own
decompressor, or a pruned float weight; the layer's input fake-quantized as the recipe says)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from slimport.errors import SlimportError
from slimport.report import Figure, Report, Table
from slimport.report.plots import bars, histograms


def document(report: dict, source: str | Path, out: str | Path, command: str) -> Report:
    cfg = report["config"]
    mods = [m if isinstance(m, str) else next(iter(m)) for m in cfg.get("modifiers") or []]
    g = (
        f" g{cfg['group_size']}"
        if cfg.get("granularity") == "group"
        else f" per-{cfg.get('granularity')}"
    )
    settings = {
        "source": report["source"],
        "output": str(out),
        "recipe": f"W{cfg['bits']}{g} {'+'.join(mods)}" + (f", {len(cfg['overrides'])} per-module overrides" if cfg.get("overrides") else ""),
        "calibration": f"{cfg.get('calib_data')} ({cfg['num_samples']} x {cfg['seq_len']})" if cfg.get("calib_data") else "none",
        "Linears compressed": report["quantized_linears"],
        "kept in float": ", ".join(report["protected_linears"]) or "none",
        "bytes": f"{report['bytes_before'] / 1e6:,.1f} MB -> {report['bytes_after'] / 1e6:,.1f} MB "
        f"({report['bytes_after'] / report['bytes_before']:.1%})",
        "seconds": report["seconds"],
    }  # fmt: skip
    doc = Report(f"slimport {command}", settings)
    rows = report["modules"]
    what = {"weight_rel_err": "relative weight error", "prune_err": "pruning loss (OBS)",
            "sparsity": "sparsity"}  # fmt: skip
    key = next((k for k in what if any(k in r for r in rows)), "sparsity")
    what = what[key]
    layers: dict[str, list[float]] = {}
    for r in rows:
        if key in r:
            m = re.search(r"\.(\d+)\.", r["module"])
            layers.setdefault(f"block {m.group(1)}" if m else r["module"], []).append(r[key])
    if layers:
        names = list(layers)
        mean = [sum(v) / len(v) for v in layers.values()]
        lo = [m - min(v) for m, v in zip(mean, layers.values(), strict=True)]
        hi = [max(v) - m for m, v in zip(mean, layers.values(), strict=True)]
        doc.add("Per layer", Figure(bars(names, mean, f"{what}, mean over the block's Linears",
                                         "per-block error (bars: min to max)", errors=[lo, hi]),
                                    f"{what} per block", "layers"))  # fmt: skip
    worst = sorted((r for r in rows if key in r), key=lambda r: -r[key])
    cols = ["module", what] + (
        ["sparsity"] if key != "sparsity" and any("sparsity" in r for r in rows) else []
    )
    doc.add("", Table(cols + ["seconds"],
                      [[r["module"], r[key]] + ([r.get("sparsity", 0.0)] if "sparsity" in cols else [])
                       + [r["seconds"]] for r in worst[:20]],
                      f"worst {min(20, len(worst))} of {len(rows)}"))  # fmt: skip
    picks = [worst[0]["module"], worst[-1]["module"]] if worst else []
    panels = _weights(Path(source), Path(out), picks)
    if panels:
        doc.add("Weights", Figure(histograms(panels, "weight value"),
                                  "weight distributions of the worst and best layer: fp32 vs output",
                                  "weights"))  # fmt: skip
    panels = _activations(Path(source), Path(out), picks, cfg)
    if panels:
        doc.add("Activations", Figure(histograms(panels, "output activation"),
                                      "output activations of the worst and best layer on "
                                      "one sequence: fp32 layer vs output layer",
                                      "activations"))  # fmt: skip
    return doc


ACT_TOKENS = 128  # one sequence: enough values for a histogram, seconds on any model


def _activations(source: Path, out: Path, names: list[str], cfg: dict) -> dict:
    """{panel: {"fp32": y, "output": y}} of each named Linear on the same input: the fp32
    source model's layer, and the same input through the output's weight (decoded), the input
    fake-quantized first when the recipe quantizes activations (static: the stored scale). The
    input is the first calibration text when there is one, else seeded random token ids."""
    from slimport.compress.quant.config import QuantizationConfig
    from slimport.compress.quant.qat import float_model
    from slimport.io import safetensors

    try:
        model = float_model(source)
    except SlimportError:
        return {}  # a source transformers cannot build: the weight panels still say a lot
    seen: dict[str, torch.Tensor] = {}

    def keep(name):  # a pre-hook that returns nothing: the forward is left as it is
        return lambda m, a: seen.__setitem__(name, a[0].detach())

    modules, first = dict(model.named_modules()), names[0] if names else None
    names = [n for n in dict.fromkeys(names) if isinstance(modules.get(n), torch.nn.Linear)]
    hooks = [modules[n].register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(input_ids=_ids(source, cfg, model.config))
    for h in hooks:
        h.remove()
    inputs = QuantizationConfig.from_dict(cfg).inputs
    index = out / "model.safetensors.index.json"
    got = safetensors.read(index if index.is_file() else out / "model.safetensors")
    panels = {}
    try:
        for n in names:  # the picks' order, not the forward's
            x, layer, w = seen.get(n), modules[n], _decoded(out, got, n)
            if x is None or w is None or w.shape != layer.weight.shape:
                continue
            xq = x if inputs is None else _fake_input(x, inputs, got, n)
            with torch.no_grad():
                y, yq = layer(x), torch.nn.functional.linear(xq, w.float(), layer.bias)
            panels[f"{n} ({'worst' if n == first else 'best'})"] = {
                "fp32": y.flatten().numpy(), "output": yq.flatten().numpy()}  # fmt: skip
    finally:
        got.close()
    return panels


def _ids(source: Path, cfg: dict, config) -> torch.Tensor:
    n = min(ACT_TOKENS, getattr(config, "max_position_embeddings", None) or ACT_TOKENS)
    if cfg.get("calib_data"):
        from slimport.data import read_texts
        from slimport.io.hf import load_tokenizer

        try:
            tok = load_tokenizer(source)
            ids = tok(read_texts(cfg["calib_data"])[0], return_tensors="pt")["input_ids"]
            return ids[:, :n]
        except (SlimportError, OSError, ValueError, IndexError):
            pass  # no tokenizer beside the weights, or an empty file: random ids below
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, n), generator=gen)


def _fake_input(x: torch.Tensor, args, ckpt, name: str) -> torch.Tensor:
    from slimport.compress.quant import primitives as P

    if args.dynamic:
        return P.dynamic_fake_quantize(x, args)
    if f"{name}.input_scale" not in ckpt.infos:
        return x
    s = ckpt.load(f"{name}.input_scale").float()
    z = ckpt.load(f"{name}.input_zero_point").float() if f"{name}.input_zero_point" in ckpt.infos else torch.zeros(())  # fmt: skip
    return P.dequantize(P.quantize(x, s, z, args.bits), s, z)


def _weights(source: Path, out: Path, names: list[str]) -> dict:
    """{panel: {"fp32": values, "output": values}} for the names both folders hold."""
    from slimport.io import safetensors
    from slimport.io.auto import open_checkpoint

    index = out / "model.safetensors.index.json"
    got = safetensors.read(index if index.is_file() else out / "model.safetensors")
    panels = {}
    try:
        with open_checkpoint(source) as src:
            for i, n in enumerate(dict.fromkeys(names)):
                if f"{n}.weight" not in src.infos:
                    continue  # a source whose names are not the hub's (GGUF): nothing to show
                w = src.load(f"{n}.weight").float()
                q = _decoded(out, got, n)
                if q is None or q.shape != w.shape:
                    continue
                panels[f"{n} ({'worst' if i == 0 else 'best'})"] = {
                    "fp32": w.flatten().numpy(), "output": q.float().flatten().numpy()}  # fmt: skip
    finally:
        got.close()
    return panels


def _decoded(folder: Path, ckpt, name: str) -> torch.Tensor | None:
    if f"{name}.weight_scale" not in ckpt.infos:
        return ckpt.load(f"{name}.weight") if f"{name}.weight" in ckpt.infos else None
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.utils.match import match_name

    qc = CTConfig.model_validate(
        json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    # the group naming the module exactly wins over the "Linear" class target (the library's rule)
    groups = list(qc.config_groups.values())
    scheme = next((s for s in groups if any(t != "Linear" and match_name(name, t) for t in s.targets)),
                  next(s for s in groups if "Linear" in s.targets))  # fmt: skip
    parts = {
        k.removeprefix(name + "."): ckpt.load(k) for k in ckpt.infos if k.rpartition(".")[0] == name
    }
    parts.pop("bias", None)
    return BaseCompressor.get_value_from_registry(scheme.format or qc.format).decompress(
        parts, scheme
    )["weight"]


def save_report(report: dict, source, out, path, command: str) -> list[Path]:
    if not report.get("modules"):
        raise SlimportError(f"--report {path}: the run has no per-module rows to report")
    return document(report, source, out, command).save(path)
