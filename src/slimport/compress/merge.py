"""Model merging: several checkpoints of one architecture into one, tensor by tensor.

Every input is read through the hub loader (`convert.loader.load`), so tensors carry Hugging
Face names whatever the file format; the merged hub tensors are planned lazily and written by
the same writers as `convert`, so only tensor i of each input is in memory while it is merged.

Semantics follow mergekit (github.com/arcee-ai/mergekit), the reference implementation:

* linear: Σ wᵢ·xᵢ, divided by Σ wᵢ when normalizing (merge_methods/linear.py);
* slerp: per tensor, flattened, the angle between the normalized tensors; nearly parallel
  ones (|cos| > 0.9995) interpolate linearly (merge_methods/slerp.py);
* task_arithmetic / ties / dare_ties / dare_linear: base + Σ wᵢ·τᵢ with task vectors
  τᵢ = xᵢ − base, TIES-trimmed to the top `density` magnitudes or DARE-dropped at random, with
  TIES' sign election and disjoint mean (merge_methods/generalized_task_arithmetic.py,
  sparsify.py). `dare` is the DARE paper's method: dare_linear.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimport.convert import engine
from slimport.convert.loader import DTYPES, Model, load, write
from slimport.errors import SlimportError, name_list
from slimport.io.formats import TARGETS


@dataclass(frozen=True)
class Method:
    task_vectors: bool  # merges xᵢ − base (needs --base)
    sparsify: str | None = None  # "magnitude" (TIES trim) or "random" (DARE drop)
    consensus: bool = False  # TIES sign election + disjoint mean
    normalize: bool = False  # mergekit's default for its `normalize` option


METHODS: dict[str, Method] = {
    "linear": Method(task_vectors=False, normalize=True),
    "slerp": Method(task_vectors=False),
    "task_arithmetic": Method(task_vectors=True),
    "ties": Method(task_vectors=True, sparsify="magnitude", consensus=True, normalize=True),
    "dare_ties": Method(task_vectors=True, sparsify="random", consensus=True),
    "dare_linear": Method(task_vectors=True, sparsify="random"),
}
ALIASES = {"dare": "dare_linear"}
DOT_THRESHOLD = 0.9995  # mergekit's: beyond it the angle is too small to divide by its sine
EPS = 1e-8


# ---- the formulas, one tensor at a time (float tensors of one shape) ----


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True):
    """Σ wᵢ·xᵢ (/ Σ wᵢ): the weighted average, or the weighted sum without normalizing."""
    out = sum(w * x for w, x in zip(weights, tensors, strict=True))
    return out / sum(weights) if normalize else out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) on the flattened tensors.

    Returns (result, whether it fell back to linear interpolation). t=0 and t=1 return the
    inputs themselves: the formula's sin(θ)/sin(θ) need not round to exactly 1."""
    if t == 0 or t == 1:
        return (v0 if t == 0 else v1), False
    n0, n1 = v0.double().norm(), v1.double().norm()
    if n0 <= EPS or n1 <= EPS:  # a zero tensor has no direction to rotate from
        return (1 - t) * v0 + t * v1, True
    dot = float((v0.double() / n0 * (v1.double() / n1)).sum())
    if abs(dot) > DOT_THRESHOLD:  # nearly parallel: sin θ ≈ 0, lerp is the limit
        return (1 - t) * v0 + t * v1, True
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s0 = float(torch.sin((1 - t) * theta) / torch.sin(theta))
    s1 = float(torch.sin(t * theta) / torch.sin(theta))
    return s0 * v0 + s1 * v1, False


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the `density` share of largest magnitudes (mergekit sparsify.magnitude;
    at least one element, where mergekit would refuse a tiny tensor)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view(delta.shape)


def drop(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability `density`, rescale the kept by 1/density
    (the paper's 1/(1-p); mergekit now rescales to the same L1 norm instead, equal in
    expectation)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=delta.dtype), generator=gen)
    return delta * mask / density


def task_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: Method,
    density: float = 1.0,
    normalize: bool | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """base + (Σ wᵢ·τᵢ) [/ Σ wᵢ], τᵢ = xᵢ − base sparsified; with consensus, only the τᵢ whose
    sign agrees with that of Σ wᵢ·τᵢ count, in the sum and in the divisor (TIES)."""
    normalize = method.normalize if normalize is None else normalize
    deltas = []
    for i, x in enumerate(tensors):
        d = x - base
        if method.sparsify == "magnitude":
            d = trim(d, density)
        elif method.sparsify == "random":
            d = drop(d, density, generators[i])
        deltas.append(d)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * base.ndim)
    weighted = stacked * w
    if method.consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = weighted.sign() == majority  # zeros (trimmed, dropped) never agree
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < EPS] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed


# ---- options, inputs, streaming ----


@dataclass
class Options:
    method: str
    weights: list[float]
    t: float | None
    density: float | None
    normalize: bool | None
    seed: int


def check_options(
    method: str,
    n_models: int,
    weights: Sequence[float] | None,
    t: float | None,
    density: float | None,
    base: str | Path | None,
    normalize: bool | None,
    seed: int,
) -> Options:
    """The options, checked against the method and the number of models, defaults filled in."""
    name = ALIASES.get(method, method)
    if name not in METHODS:
        choices = ", ".join([*METHODS, *ALIASES])
        raise SlimportError(f"unknown --method {method!r}", hint=f"one of: {choices}")
    m = METHODS[name]
    if n_models < (1 if m.task_vectors else 2):
        raise SlimportError(
            f"--method {method} merges {'one or more models into --base' if m.task_vectors else 'two or more models'}; got {n_models}"
        )
    if m.task_vectors and base is None:
        raise SlimportError(
            f"--method {method} needs --base BASE: the model the others were fine-tuned from "
            "(task vectors are model − base)"
        )
    if not m.task_vectors and base is not None:
        raise SlimportError(
            f"--base applies to task_arithmetic, ties and dare; --method {method} merges the "
            "models themselves"
        )
    if name == "slerp":
        if n_models != 2:
            raise SlimportError(f"--method slerp interpolates exactly two models; got {n_models}")
        if weights is not None:
            raise SlimportError("--method slerp takes --t, not --weights")
        t = 0.5 if t is None else t
        if not 0 <= t <= 1:
            raise SlimportError(f"--t {t:g} is outside [0, 1] (0 gives A, 1 gives B)")
    elif t is not None:
        raise SlimportError(f"--t applies to slerp only, not --method {method}")
    if m.sparsify:
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise SlimportError(
                f"--density {density:g} is outside (0, 1]: the share of each task vector kept"
            )
    elif density is not None:
        raise SlimportError(f"--density applies to ties and dare, not --method {method}")
    if name != "slerp":
        weights = [1.0] * n_models if weights is None else [float(w) for w in weights]
        if not all(math.isfinite(w) for w in weights):
            raise SlimportError(f"--weights {weights}: every weight must be a finite number")
        if len(weights) != n_models:
            raise SlimportError(
                f"--weights has {len(weights)} value(s) for {n_models} model(s); give one per model"
            )
        normalizing = m.normalize if normalize is None else normalize
        if normalizing and abs(sum(weights)) < EPS:
            raise SlimportError("--weights sum to 0: cannot normalize (pass --no-normalize)")
    elif normalize is not None:
        raise SlimportError("--normalize does not apply to --method slerp")
    return Options(name, list(weights or []), t, density, normalize, seed)


def _check_same(models: list[Model], paths: list) -> None:
    """Same family, architecture, tensor names and shapes; errors name what differs."""
    first, p0 = models[0], paths[0]
    for m, p in zip(models[1:], paths[1:], strict=True):
        a0, a = first.config.get("architectures"), m.config.get("architectures")
        if (
            m.family.name != first.family.name
            or m.cfg["model_type"] != first.cfg["model_type"]
            or (a0 and a and a0 != a)
        ):
            raise SlimportError(
                f"cannot merge different architectures: {p0} is {first.cfg['model_type']} "
                f"{a0 or ''}, {p} is {m.cfg['model_type']} {a or ''}"
            )
        missing, extra = set(first.hub) - set(m.hub), set(m.hub) - set(first.hub)
        if missing or extra:
            raise SlimportError(
                f"{p} does not hold the same tensors as {p0}: "
                + (f"missing {name_list(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"extra {name_list(extra)}" if extra else "")
            )
        bad = [
            f"{n}: {list(first.hub[n].shape)} vs {list(t.shape)}"
            for n, t in m.hub.items()
            if tuple(t.shape) != tuple(first.hub[n].shape)
        ]
        if bad:
            raise SlimportError(
                f"cannot merge {p0} and {p}: {len(bad)} tensor shape(s) differ: "
                + "; ".join(bad[:8])
            )


def merge_tensor(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, opts: Options, stats: dict
) -> torch.Tensor:
    """One merged tensor, in the first model's dtype; computed in float32 (or wider)."""
    out_dtype = tensors[0].dtype
    everything = [*tensors, *([base] if base is not None else [])]
    equal = all(torch.equal(everything[0], x) for x in everything[1:])
    if not all(x.is_floating_point() for x in everything):
        if equal:  # an integer buffer (position ids): copied, never averaged
            return tensors[0]
        raise SlimportError(
            f"tensor {name!r} is not floating point and differs between the inputs: it cannot "
            "be merged",
            hint="integer buffers must be equal in every model",
        )
    method = METHODS[opts.method]
    normalize = method.normalize if opts.normalize is None else opts.normalize
    if equal and (opts.method != "linear" or normalize):
        # every method but an unnormalized sum returns a tensor all inputs share, exactly
        stats["identical"] += 1
        return tensors[0]
    work = torch.promote_types(torch.float32, out_dtype)
    xs = [x.to(work) for x in tensors]
    if opts.method == "linear":
        out = linear(xs, opts.weights, normalize)
    elif opts.method == "slerp":
        out, fell_back = slerp(opts.t, xs[0], xs[1])
        stats["lerp_fallback"] += fell_back
    else:
        gens = [
            torch.Generator().manual_seed(zlib.crc32(f"{opts.seed}:{i}:{name}".encode()))
            for i in range(len(xs))
        ]  # one stream per (model, tensor): the result does not depend on the writing order
        out = task_merge(
            base.to(work), xs, opts.weights, method, opts.density or 1.0, opts.normalize, gens
        )
    return out.to(out_dtype)


def merge(
    models: Sequence[str | Path],
    out: str | Path,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    t: float | None = None,
    density: float | None = None,
    base: str | Path | None = None,
    to: str = "hf",
    dtype: str | None = None,
    normalize: bool | None = None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Merge same-architecture checkpoints `models` into folder `out` (the `to` layout, with
    the first model's config and tokenizer). Returns the report (conversion_report.json, with
    a "merge" entry). See the module docstring for the methods."""
    t0 = time.perf_counter()
    opts = check_options(method, len(models), weights, t, density, base, normalize, seed)
    if to not in TARGETS:
        raise SlimportError(f"unknown --to target {to!r}", hint="one of: " + ", ".join(TARGETS))
    if dtype is not None and dtype not in DTYPES:
        raise SlimportError(f"unknown --dtype {dtype!r}", hint="one of: " + ", ".join(DTYPES))
    paths = [*models, *([base] if base is not None else [])]
    loaded: list[Model] = []
    try:
        for p in paths:
            loaded.append(load(p))
        _check_same(loaded, paths)
        inputs, base_model = loaded[: len(models)], loaded[len(models)] if base else None
        stats = {"identical": 0, "lerp_fallback": 0}
        bar = tqdm(total=len(inputs[0].hub), unit="tensor", desc=f"merge {opts.method}",
                   disable=not progress or None, leave=False)  # fmt: skip

        def compute(name: str) -> torch.Tensor:
            tensors = [m.hub[name].compute() for m in inputs]
            b = base_model.hub[name].compute() if base_model else None
            merged = merge_tensor(name, tensors, b, opts, stats)
            bar.update()
            return merged

        first = inputs[0]
        hub = {
            n: engine.Planned(n, p.shape, p.dtype, p.sources, (f"merge:{opts.method}",),
                              (lambda n=n: compute(n)))
            for n, p in first.hub.items()
        }  # fmt: skip
        summary = {
            "method": opts.method,
            "models": [str(p) for p in models],
            "base": None if base is None else str(base),
            "weights": opts.weights or None,
            "t": opts.t,
            "density": opts.density,
            "normalize": opts.normalize,
            "seed": opts.seed if METHODS[opts.method].sparsify == "random" else None,
            "out": str(out),
            "tensors": len(hub),
            "stats": stats,  # filled in while the tensors are written
        }
        with bar:
            report = write(
                first, hub, out, to, DTYPES.get(dtype), None, False, overwrite, paths, t0,
                extra={"merge": summary},
            )  # fmt: skip
    finally:
        for m in loaded:
            m.source.close()
    return report


def summary(report: dict) -> str:
    """What `slimport merge` prints at the end."""
    m = report["merge"]
    knobs = {k: m[k] for k in ("weights", "t", "density", "normalize", "seed") if m[k] is not None}
    lines = [
        f"merged {len(m['models'])} model(s) with {m['method']}"
        + (f" onto base {m['base']}" if m["base"] else "")
        + "".join(f", {k}={v}" for k, v in knobs.items()),
        f"{m['tensors']} tensors, {report['parameter_count']:,} parameters; "
        f"{m['stats']['identical']} tensor(s) equal in every input kept as they are"
        + (f"; {m['stats']['lerp_fallback']} nearly parallel, interpolated linearly"
           if m["method"] == "slerp" else ""),
        f"wrote {m['out']} ({report['target']}) in {report['seconds']:.1f} s",
    ]  # fmt: skip
    return "\n".join(lines)
