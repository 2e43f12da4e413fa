"""Compression algorithms as typed configs (torchao's `quantize_` configs, llm-compressor's
modifiers): one frozen dataclass per algorithm, registered under its recipe name.

A recipe is an ordered list of modifiers; the pipeline calls each one's handler (handlers.py) on
every block in that order. Adding an algorithm = a config here + a handler there; the pipeline is
not edited. Pure data: nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from slimport.compress.fields import check_field_types
from slimport.errors import SlimportError

MODIFIERS: dict[str, type[Modifier]] = {}


@dataclass(frozen=True)
class Modifier:
    """Base of every algorithm config. `name` is its recipe spelling (`method: awq+gptq`)."""

    name: ClassVar[str] = ""
    # the algorithm turns float Linears into quantized ones (exactly one such modifier per recipe)
    rounds: ClassVar[bool] = False
    # the rounding compensates its own error (GPTQ): AWQ's automatic clipping then stays off
    error_feedback: ClassVar[bool] = False
    # the algorithm migrates scales between layers (at most one per recipe: they would fight)
    migrates: ClassVar[bool] = False
    # the algorithm zeroes weights (pruning; at most one per recipe, before any rounding)
    prunes: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True

    def options(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, options: dict | None) -> Modifier:
        """A config from a recipe's option mapping; an unknown key is an error naming the valid ones."""
        if options is not None and not isinstance(options, dict):
            raise SlimportError(
                f"quantization option {cls.name}: {options!r} is not a mapping of options",
                hint=f"{cls.name}: {{option: value}}",
            )
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SlimportError(
                f"unknown {cls.name} option(s): {', '.join(unknown)}",
                hint=f"{cls.name} takes: " + (", ".join(known) or "no options"),
            )
        check_field_types(cls, options, f"{cls.name} option")
        return cls(**options)

    def check_layers(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse, before any work, layers (name -> [out, in]) this algorithm cannot handle."""


def _bad(m: Modifier, why: str):
    kind = "pruning" if m.prunes else "quantization"
    raise SlimportError(f"{kind} option {m.name}: {why}")


def register(cls: type[Modifier]) -> type[Modifier]:
    if cls.name in MODIFIERS:
        raise ValueError(f"modifier {cls.name!r} registered twice")
    MODIFIERS[cls.name] = cls
    return cls


def modifier(name: str, options: dict | None = None) -> Modifier:
    if name not in MODIFIERS:
        raise SlimportError(
            f"unknown quantization method {name!r}",
            hint="one of " + ", ".join(sorted(MODIFIERS)),
        )
    return MODIFIERS[name].parse(options)


def parse_modifiers(spec) -> list[Modifier]:
    """A recipe's `modifiers:` list: configs, names, or {name: options} mappings."""
    out = []
    for item in spec:
        if isinstance(item, Modifier):
            out.append(item)
        elif isinstance(item, str):
            out.append(modifier(item))
        elif isinstance(item, dict) and len(item) == 1:
            ((name, opts),) = item.items()
            out.append(modifier(name, opts))
        else:
            raise SlimportError(
                f"modifier {item!r}: expected a name or a one-key mapping {{name: {{options}}}}"
            )
    return out


def check_order(mods: list[Modifier]) -> None:
    """At most one pruning and one rounding step, at least one of the two; scale migration
    before both, pruning before rounding (which then keeps the pruned weights at zero);
    observers after the rounding."""
    rounding = [i for i, m in enumerate(mods) if m.rounds]
    pruning = [i for i, m in enumerate(mods) if m.prunes]
    if len(rounding) > 1 or len(pruning) > 1 or not (rounding or pruning):
        raise SlimportError(
            f"a recipe rounds the weights exactly once, or prunes them (or both, once each); got "
            f"{len(rounding)} rounding and {len(pruning)} pruning modifiers "
            f"({', '.join(m.name for m in mods)})",
            hint="rounding modifiers: "
            + ", ".join(n for n, c in sorted(MODIFIERS.items()) if c.rounds)
            + "; pruning modifiers: "
            + ", ".join(n for n, c in sorted(MODIFIERS.items()) if c.prunes),
        )
    migrating = [m.name for m in mods if m.migrates]
    if len(migrating) > 1:
        raise SlimportError(
            f"{' and '.join(migrating)} both rescale channels; use one of the two",
            hint="AWQ already rescales channels",
        )
    first = min(rounding + pruning)
    if any(m.migrates for m in mods[first:]):
        raise SlimportError("scale migration must come before the weights are pruned or rounded")
    if rounding and pruning and pruning[0] > rounding[0]:
        raise SlimportError(
            f"{mods[pruning[0]].name} after {mods[rounding[0]].name}: prune first, then quantize "
            "the weights that are kept",
            hint=f"modifiers: [{mods[pruning[0]].name}, {mods[rounding[0]].name}]",
        )


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' (N of every M consecutive input weights are zero,
    0 < N < M) -> (N, M)."""
    if pattern == "unstructured":
        return None
    n, sep, m = str(pattern).partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise SlimportError(
        f"sparsity pattern {pattern!r} does not parse",
        hint="'unstructured', or N:M with 0 < N < M (N of every M weights zero): 2:4, 4:8",
    )


# ---------------------------------------------------------------- the algorithms


@register
@dataclass(frozen=True)
class RTNConfig(Modifier):
    """Round to nearest with the recipe's weight observer (min-max, or an MSE clip search)."""

    name: ClassVar[str] = "rtn"
    rounds: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False


@register
@dataclass(frozen=True)
class GPTQConfig(Modifier):
    """GPTQ (Frantar et al., 2022): column-by-column rounding with Hessian error feedback."""

    name: ClassVar[str] = "gptq"
    rounds: ClassVar[bool] = True
    error_feedback: ClassVar[bool] = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        if not self.damp > 0 or self.block_size <= 0:
            _bad(self, f"damp {self.damp} and block_size {self.block_size} must be positive")


@register
@dataclass(frozen=True)
class AWQConfig(Modifier):
    """AWQ (Lin et al., 2023) channel scales searched on `grid` points, then weight clipping.
    clip None = automatic: on, unless a later rounding feeds its error back (GPTQ did better
    alone on SmolLM2 W4 g64). `max_tokens` caps the calibration tokens kept per Linear input."""

    name: ClassVar[str] = "awq"
    migrates: ClassVar[bool] = True
    grid: int = 20
    clip: bool | None = None
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.grid <= 0 or self.max_tokens <= 0:
            _bad(self, f"grid {self.grid} and max_tokens {self.max_tokens} must be positive")


@register
@dataclass(frozen=True)
class SmoothQuantConfig(Modifier):
    """SmoothQuant (Xiao et al., 2022): s_j = max|X_j|^alpha / max|W_j|^(1-alpha)."""

    name: ClassVar[str] = "smoothquant"
    migrates: ClassVar[bool] = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            _bad(self, f"alpha {self.alpha} is outside [0, 1]")


@dataclass(frozen=True)
class StaticInputsConfig(Modifier):
    """Static activation ranges: each quantized Linear's input range, observed on the inputs the
    quantized weights produce. Not a recipe entry: the recipe adds it for `activations: static`."""

    name: ClassVar[str] = "static_inputs"


# ---------------------------------------------------------------- pruning


@dataclass(frozen=True)
class PruneModifier(Modifier):
    """One-shot pruning of every Linear the recipe compresses. `sparsity` is the fraction of
    weights set to zero (None: 0.5, or N/M for an N:M `pattern`); `per_module` maps name
    regexes to their own sparsity (the first match wins); `ignore` regexes name Linears left
    dense (they are still quantized when the recipe quantizes)."""

    prunes: ClassVar[bool] = True
    sparsity: float | None = None
    pattern: str = "unstructured"
    per_module: dict = field(default_factory=dict)
    ignore: tuple = ()

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "per_module", dict(self.per_module))
        for p in (*self.ignore, *self.per_module):
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                _bad(self, f"{p!r} is not a valid module pattern ({e})")
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                _bad(
                    self, f"pattern {self.pattern} means sparsity {implied:g}, not {self.sparsity}"
                )
            if self.per_module:
                _bad(self, "per_module sparsities are for unstructured pruning, not N:M")
        for name, s in [("sparsity", self.sparsity), *self.per_module.items()]:
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                                  or not 0.0 <= s < 1.0):  # fmt: skip
                _bad(self, f"sparsity {s!r} ({name}) is outside [0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def sparsity_of(self, module: str) -> float:
        """The sparsity of the Linear `module` (full name); 0 when it is ignored."""
        if any(re.search(p, module) for p in self.ignore):
            return 0.0
        for p, s in self.per_module.items():
            if re.search(p, module):
                return float(s)
        nm = self.nm
        return nm[0] / nm[1] if nm else 0.5 if self.sparsity is None else float(self.sparsity)

    def check_layers(self, shapes: dict[str, tuple[int, int]]) -> None:
        nm = self.nm
        if nm is None:
            return
        bad = [f"{n} ({i} inputs)" for n, (_, i) in shapes.items()
               if i % nm[1] and self.sparsity_of(n) > 0]  # fmt: skip
        if bad:
            raise SlimportError(
                f"{self.name} pattern {self.pattern}: {nm[1]} does not divide the input size of "
                + ", ".join(bad[:4])
                + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""),
                hint="leave those modules dense (`ignore`), or pick an M that divides every input",
            )


@register
@dataclass(frozen=True)
class MagnitudeConfig(PruneModifier):
    """Magnitude pruning: the smallest |W| of each Linear (of each group of M for N:M)."""

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False


@register
@dataclass(frozen=True)
class WandaConfig(PruneModifier):
    """Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, the smallest pruned in each output row
    (each group of M inputs of a row for N:M)."""

    name: ClassVar[str] = "wanda"


@register
@dataclass(frozen=True)
class SparseGPTConfig(PruneModifier):
    """SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the layer Hessian, column by
    column with lazy-batch error feedback; the mask chosen per block of `block_size` columns
    (per group of M for N:M) by w^2 / [H^-1]_jj."""

    name: ClassVar[str] = "sparsegpt"
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0 or self.block_size <= 0:
            _bad(self, f"damp {self.damp} and block_size {self.block_size} must be positive")
        nm = self.nm
        if nm and self.block_size % nm[1]:
            _bad(self, f"block_size {self.block_size} is not a multiple of M={nm[1]}")
