"""Planning a conversion: source dialect -> hub -> target dialect, strictly and lazily.

Nothing is read while planning: every tensor is a `Planned` with its final shape and dtype
(found by running the op chain on meta tensors) and a `compute()` that reads and transforms it
when the writer asks. Coverage is strict: every source tensor consumed once, every hub tensor
the config implies present with the shape the config implies, every target tensor produced.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slimport.arch.ops import Cast, Transpose, run_ops
from slimport.arch.rules import Bound, Family
from slimport.errors import SlimportError, name_list
from slimport.io.base import Checkpoint
from slimport.io.compressed import IntLinear

# Known leftovers that carry no model weights, for every family.
ALWAYS_IGNORABLE = (
    r".*position_ids$",
    r".*rotary_emb\.inv_freq$",
    r".*num_batches_tracked$",
)


@dataclass
class Planned:
    """One tensor of a conversion, not yet read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[str, ...]
    ops: tuple[str, ...]
    compute: Callable[[], torch.Tensor] = field(repr=False)
    # the quantized Linear this weight dequantizes, its read() laid out as this tensor is:
    # for writers that store the integers (GGUF); None when the ops do more than move rows
    quantized: IntLinear | None = field(default=None, repr=False)
    in_out: bool = False  # this tensor is `quantized`'s layout transposed (see source_tensors)


class _Group:
    """Runs one bound rule once and hands out its outputs (a split yields several)."""

    def __init__(self, inputs: list[Callable[[], torch.Tensor]], fn, n_out: int):
        self.inputs, self.fn, self.n_out = inputs, fn, n_out
        self.cache: list[torch.Tensor] | None = None
        self.taken = 0

    def get(self, i: int) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.fn([load() for load in self.inputs])
        out = self.cache[i]
        self.taken += 1
        if self.taken >= self.n_out:  # free memory once every output was handed out
            self.cache, self.taken = None, 0
        return out


def _apply(
    bound: Bound,
    inputs: list[Planned],
    out_names: tuple[str, ...],
    cfg: dict,
    inverse: bool,
    extra_ops: tuple = (),
) -> list[Planned]:
    ops = tuple(bound.ops) + tuple(extra_ops)
    names = (bound.dialect, bound.hub) if inverse else (bound.hub, bound.dialect)

    def fn(ts):
        return run_ops(ops, ts, cfg, inverse, names)

    metas = fn([torch.empty(p.shape, dtype=p.dtype, device="meta") for p in inputs])
    group = _Group([p.compute for p in inputs], fn, len(out_names))
    desc = tuple(op.describe(inverse) for op in (reversed(ops) if inverse else ops))
    sources = tuple(s for p in inputs for s in p.sources)
    prior = tuple(o for p in inputs for o in p.ops)
    return [
        Planned(name, tuple(m.shape), m.dtype, sources, prior + desc, (lambda i=i: group.get(i)),
                *_integers(inputs, ops, cfg, inverse, names, i))
        for i, (name, m) in enumerate(zip(out_names, metas, strict=True))
    ]  # fmt: skip


def _integers(inputs, ops, cfg, inverse, names, i) -> tuple[IntLinear | None, bool]:
    """(quantized Linear, in_out) of a one-input rule's output `i`, when the rule only moves
    rows: its integers, scales and zero points go through the same ops (a Cast changes the float
    weight, not the integers and scales it comes from). A weight read transposed ([in, out],
    `in_out`) keeps them only untouched or transposed back first."""
    lin = inputs[0].quantized if len(inputs) == 1 else None
    ops = tuple(op for op in ops if not isinstance(op, Cast))
    if lin is not None and inputs[0].in_out:
        if not ops:
            return lin, True
        if ops[0] != Transpose():
            return None, False
        ops = ops[1:]
    if lin is None or not all(op.rowwise for op in ops):
        return None, False
    if not ops:
        return lin, False

    def read():
        return tuple(run_ops(ops, [t], cfg, inverse, names)[i] for t in lin.read())

    return dataclasses.replace(lin, read=read), False


def source_tensors(ckpt: Checkpoint, in_out: set[str] = frozenset()) -> dict[str, Planned]:
    """Every tensor of `ckpt`, planned as stored; a quantized Linear's weight named in `in_out`
    is read transposed, [out, in] -> [in, out], the layout its model class holds (Conv1D)."""
    out = {
        n: Planned(n, info.shape, info.dtype, (n,), (), (lambda n=n: ckpt.load(n)),
                   ckpt.quantized.get(n.removesuffix(".weight")) if n.endswith(".weight") else None)
        for n, info in ckpt.infos.items()
    }  # fmt: skip
    for n in in_out & {f"{q}.weight" for q in ckpt.quantized}:
        p, t = out[n], Transpose()
        out[n] = Planned(n, p.shape[::-1], p.dtype, p.sources, (t.describe(),),
                         (lambda p=p, t=t: t.apply(p.compute(), {})), p.quantized, in_out=True)  # fmt: skip
    return out


def _patterns(patterns: tuple[str, ...], option: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise SlimportError(f"{option} {p!r}: not a valid regular expression ({e})") from None
    return compiled


def _finite(p: Planned, cast: torch.dtype | None) -> Planned:
    """`p` whose compute() refuses NaN/Inf: copied silently they poison every output downstream."""
    inner = p.compute

    def compute() -> torch.Tensor:
        t = inner()
        if t.is_floating_point() and not _all_finite(t):
            if cast is not None:
                raise SlimportError(
                    f"tensor {p.name!r} (from {', '.join(p.sources)}): NaN/Inf after casting to "
                    f"{str(cast).removeprefix('torch.')} (values out of its range, or already in the source)",
                    hint="keep the source dtype or use --dtype bfloat16 / float32",
                )
            raise SlimportError(
                f"tensor {p.name!r} (from {', '.join(p.sources)}): holds NaN or Inf values",
                hint="the checkpoint is damaged or was saved from a diverged training run",
            )
        return t

    p.compute = compute
    return p


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    flat = t.reshape(-1)  # in chunks: a whole-tensor mask would cost a quarter of the tensor again
    return all(
        bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk)
    )


def dialect_score(ckpt: Checkpoint, family: Family, dialect: str, cfg: dict) -> int:
    names = {n for b in family.bound_rules(dialect, cfg) for n in b.dialect}
    return sum(n in names for n in ckpt.infos)


def to_hub(
    ckpt: Checkpoint,
    family: Family,
    dialect: str,
    cfg: dict,
    ignore_mismatched_sizes: bool = False,
    allow_missing: tuple[str, ...] = (),
) -> tuple[dict[str, Planned], list[str], list[str]]:
    """Read `ckpt` as `dialect` of `family` into hub tensors.

    Returns (hub tensors, ignored source names, notes about explicit opt-ins).
    """
    src = source_tensors(ckpt, family.in_out_weights(cfg) if dialect == "hf" else set())
    allowed = _patterns(allow_missing, "--allow-missing")
    bounds = family.bound_rules(dialect, cfg)
    owner = {n: b for b in bounds for n in b.dialect}
    ignorable = [re.compile(p) for p in ALWAYS_IGNORABLE + family.ignorable]

    unconsumed, ignored = [], []
    for n in src:
        if n in owner:
            continue
        (ignored if any(p.fullmatch(n) for p in ignorable) else unconsumed).append(n)
    if unconsumed:
        raise SlimportError(
            f"{ckpt.path}: {len(unconsumed)} tensor(s) match no rule of the {family.name} "
            f"'{dialect}' layout: {name_list(unconsumed)}",
            hint="is this the right architecture/config? Map custom names with --mapping FILE",
        )

    hub: dict[str, Planned] = {}
    missing = []
    for b in bounds:
        present = [n in src for n in b.dialect]
        if not all(present):
            missing += [n for n, ok in zip(b.dialect, present, strict=True) if not ok]
            continue
        for n in b.dialect:
            if not src[n].dtype.is_floating_point:  # a weight is a float; ints here mean a lie
                raise SlimportError(
                    f"{ckpt.path}: tensor {n!r} is {str(src[n].dtype).removeprefix('torch.')}, "
                    "but model weights are floating point",
                    hint="the file is damaged or not this model's weights",
                )
        for p in _apply(b, [src[n] for n in b.dialect], b.hub, cfg, inverse=True):
            hub[p.name] = p
    notes = []
    if missing:
        really = [n for n in missing if not any(a.fullmatch(n) for a in allowed)]
        if really:
            raise SlimportError(
                f"{ckpt.path}: {len(really)} tensor(s) the config implies are missing: "
                f"{name_list(really)}",
                hint="check num_hidden_layers / tie_word_embeddings in the config, or that "
                "every shard is present",
            )
        notes.append(f"allowed missing: {name_list(missing)}")

    expected = family.hub_tensors(cfg)
    bad = [
        f"{n}: checkpoint {list(p.shape)} vs config {list(expected[n])}"
        for n, p in hub.items()
        if n in expected and tuple(p.shape) != expected[n]
    ]
    if bad and not ignore_mismatched_sizes:
        raise SlimportError(
            f"{ckpt.path}: {len(bad)} shape mismatch(es) between checkpoint and config: "
            + "; ".join(bad[:8]),
            hint="fix the config, or pass --ignore-mismatched-sizes to keep the checkpoint shapes",
        )
    if bad:
        notes.append("kept mismatched sizes: " + "; ".join(bad))
    return hub, ignored, notes


def from_hub(
    hub: dict[str, Planned],
    family: Family,
    dialect: str,
    cfg: dict,
    dtype: torch.dtype | None = None,
) -> list[Planned]:
    """Lay hub tensors out as `dialect`, optionally casting floating tensors to `dtype`."""
    out: list[Planned] = []
    used: set[str] = set()
    for b in family.bound_rules(dialect, cfg):
        present = [n in hub for n in b.hub]
        if not any(present):
            continue  # an allowed-missing tensor
        if not all(present):
            lacking = [n for n, ok in zip(b.hub, present, strict=True) if not ok]
            raise SlimportError(
                f"the {family.name} '{dialect}' layout needs {name_list(lacking)} to build "
                f"{name_list(b.dialect)}"
            )
        inputs = [hub[n] for n in b.hub]
        cast = ()
        if dtype is not None and any(
            p.dtype.is_floating_point and p.dtype != dtype for p in inputs
        ):
            cast = (Cast(dtype),)
        planned = _apply(b, inputs, b.dialect, cfg, inverse=False, extra_ops=cast)
        out += [_finite(p, dtype if cast else None) for p in planned]
        used.update(b.hub)
    left = set(hub) - used
    if left:
        raise SlimportError(
            f"the {family.name} '{dialect}' layout has no place for: {name_list(left)}",
            hint=f"this tensor kind cannot be expressed in '{dialect}'; choose another --to",
        )
    return out
