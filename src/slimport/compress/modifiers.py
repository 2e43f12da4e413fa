"""Compression algorithms as typed configs (torchao's `quantize_` configs, llm-compressor's
modifiers): one frozen dataclass per algorithm, registered under its recipe name.

A recipe is an ordered list of modifiers; the pipeline calls each one's handler (handlers.py) on
every block in that order. Adding an algorithm = a config here + a handler there; the pipeline is
not edited. Pure data: nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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


def _bad(m: Modifier, why: str):
    raise SlimportError(f"quantization option {m.name}: {why}")


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
    """One rounding step; scale migration before it; observers after it."""
    rounding = [i for i, m in enumerate(mods) if m.rounds]
    if len(rounding) != 1:
        raise SlimportError(
            f"a recipe rounds the weights exactly once; got {len(rounding)} rounding modifiers "
            f"({', '.join(m.name for m in mods)})",
            hint="rounding modifiers: "
            + ", ".join(n for n, c in sorted(MODIFIERS.items()) if c.rounds),
        )
    migrating = [m.name for m in mods if m.migrates]
    if len(migrating) > 1:
        raise SlimportError(
            f"{' and '.join(migrating)} both rescale channels; use one of the two",
            hint="AWQ already rescales channels",
        )
    if any(m.migrates for m in mods[rounding[0] :]):
        raise SlimportError("scale migration must come before the weights are rounded")


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
