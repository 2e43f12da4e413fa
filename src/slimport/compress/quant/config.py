"""What to quantize and how: `QuantizationConfig`, readable from kwargs, a YAML recipe or the
seeds' dict form, and validated once here so every later stage can trust it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from slimport.errors import SlimportError

# awq+gptq: AWQ's activation-aware channel scales, then GPTQ's error-compensating rounding
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
OBSERVERS = ("min_max", "ema_min_max", "percentile", "mse", "kl")
GRANULARITIES = ("tensor", "channel", "group")
ACTIVATIONS = (None, "static", "dynamic")
# what a default run leaves in full precision: output heads, whose errors nothing downstream fixes
DEFAULT_PROTECT = (r"(^|\.)lm_head$", r"(^|\.)classifier$", r"(^|\.)score$")


@dataclass(frozen=True)
class QuantArgs:
    """How one kind of tensor (weights, or a layer's input activations) is quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # tensor | channel | group | token (activations, dynamic)
    group_size: int | None = None
    dynamic: bool = False


@dataclass
class QuantizationConfig:
    """A quantization recipe. Defaults: 8-bit symmetric per-channel RTN weights, lm_head kept.

    bits 16 casts to `dtype16`; 8, 4 quantize weights (3 with GPTQ). `activations` adds 8-bit
    input quantization to every quantized Linear: "static" (per-tensor scale calibrated by
    `observer`) or "dynamic" (per-token at run time). `smoothquant` (alpha) migrates activation
    outliers into weights first and composes with any method.
    """

    bits: int = 8
    method: str = "rtn"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    activations: str | None = None
    act_bits: int = 8
    # activations default to an asymmetric grid: inputs after GELU/SiLU are nearly one-sided, and a
    # zero point doubles their resolution (MiniLM SST-2 W8A8 min_max: agreement 98.05% -> 98.97%)
    act_symmetric: bool | None = False  # None: as `symmetric`
    observer: str = "min_max"  # activation ranges (static)
    weight_observer: str = "min_max"  # min_max, or mse to search a clipping range per row/group
    observer_options: dict = field(default_factory=dict)  # decay, percentile, bins, grid ...
    smoothquant: float | None = None
    protect: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECT))
    dtype16: str = "float16"
    # algorithm knobs
    gptq: dict = field(default_factory=lambda: {"damp": 0.01, "block_size": 128, "act_order": True})
    # clip None = automatic: AWQ's weight clipping with RTN, none before GPTQ (whose error feedback
    # did better alone on SmolLM2 W4 g64)
    awq: dict = field(default_factory=lambda: {"grid": 20, "clip": None, "max_tokens": 4096})
    # calibration data
    calib_data: str | None = None
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group_size is not None and self.granularity == "channel":
            self.granularity = "group"
        self.validate()

    # ---- views used by the quantizers
    @property
    def weights(self) -> QuantArgs:
        return QuantArgs(self.bits, self.symmetric, self.granularity, self.group_size)

    @property
    def inputs(self) -> QuantArgs | None:
        if self.activations is None:
            return None
        sym = self.symmetric if self.act_symmetric is None else self.act_symmetric
        if self.activations == "dynamic":
            return QuantArgs(self.act_bits, sym, "token", None, dynamic=True)
        return QuantArgs(self.act_bits, sym, "tensor", None)

    @property
    def awq_scaling(self) -> bool:
        return self.method in ("awq", "awq+gptq")

    @property
    def gptq_weights(self) -> bool:
        return self.method in ("gptq", "awq+gptq")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.activations == "static" or self.smoothquant is not None

    def is_protected(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.protect)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- construction
    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        """Our own keys, or the seeds' form {"quant_mode": "8bit", "calib_method": ...}."""
        d = dict(d)
        if "quant_mode" in d:
            d = _from_seed_form(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SlimportError(
                f"unknown quantization option(s): {', '.join(unknown)}",
                hint="known: " + ", ".join(sorted(known)),
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantizationConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SlimportError(f"{path}: cannot read the recipe ({e})") from None
        if not isinstance(data, dict):
            raise SlimportError(
                f"{path}: a recipe is a mapping of options, got {type(data).__name__}"
            )
        data = data.get("quantization", data)
        try:
            return cls.from_dict(data)
        except SlimportError as e:
            raise SlimportError(f"{path}: {e.message}", hint=e.hint) from None

    def validate(self) -> None:
        def bad(option: str, why: str, hint: str | None = None):
            raise SlimportError(f"quantization option {option}: {why}", hint=hint)

        if self.bits not in (16, 8, 4, 3):
            bad("bits", f"{self.bits} is not supported", "one of 16, 8, 4, 3")
        if self.method not in METHODS:
            bad("method", f"unknown {self.method!r}", "one of " + ", ".join(METHODS))
        if self.bits == 3 and not self.gptq_weights:
            bad("bits", "3-bit weights need method gptq (RTN/AWQ lose too much at 3 bits)")
        if self.bits == 16 and (self.method != "rtn" or self.activations or self.smoothquant):
            bad("bits", "16-bit is a plain cast: no method, activations or smoothquant")
        if self.granularity not in GRANULARITIES:
            bad(
                "granularity", f"unknown {self.granularity!r}", "one of " + ", ".join(GRANULARITIES)
            )
        if self.granularity == "group" and (not self.group_size or self.group_size <= 0):
            bad("group_size", "per-group quantization needs a positive group_size")
        if self.activations not in ACTIVATIONS:
            bad("activations", f"unknown {self.activations!r}", "static or dynamic")
        if self.activations and self.act_bits != 8:
            bad("act_bits", f"{self.act_bits}-bit activations are not supported", "use 8")
        if self.observer not in OBSERVERS:
            bad("observer", f"unknown {self.observer!r}", "one of " + ", ".join(OBSERVERS))
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            bad("smoothquant", f"alpha {self.smoothquant} is outside [0, 1]")
        if self.smoothquant is not None and self.awq_scaling:
            bad("smoothquant", "AWQ already rescales channels; use one of the two")
        if self.dtype16 not in ("float16", "bfloat16"):
            bad("dtype16", f"unknown {self.dtype16!r}", "float16 or bfloat16")
        if self.num_samples <= 0 or self.seq_len <= 0:
            bad("num_samples/seq_len", "must be positive")
        if self.weight_observer not in ("min_max", "mse"):
            bad("weight_observer", f"unknown {self.weight_observer!r}", "min_max or mse")
        for p in self.protect:
            try:
                re.compile(p)
            except re.error as e:
                bad("protect", f"{p!r} is not a valid pattern ({e})")


def _from_seed_form(d: dict) -> dict:
    """{"quant_mode": "8bit"|"4bit"|"16bit", "calib_method", "protect_layer", "per_channel_quant",
    "symmetric"}: 8bit is weights + static activations (the seeds calibrate activations),
    4bit weight-only, 16bit a cast."""
    mode = d.pop("quant_mode")
    modes = {"8bit": 8, "4bit": 4, "16bit": 16}
    if mode not in modes:
        raise SlimportError(
            f"quantization option quant_mode: unknown {mode!r}", hint="8bit, 4bit or 16bit"
        )
    out: dict = {"bits": modes[mode]}
    if mode == "8bit":
        out["activations"] = "static"
    if "calib_method" in d:
        out["observer"] = d.pop("calib_method")
    if "protect_layer" in d:
        out["protect"] = [
            re.escape(n) + "$" if not _looks_like_regex(n) else n for n in d.pop("protect_layer")
        ]
    if "per_channel_quant" in d:
        out["granularity"] = "channel" if d.pop("per_channel_quant") else "tensor"
    if "symmetric" in d:
        out["symmetric"] = d.pop("symmetric")
    out.update(d)
    return out


def _looks_like_regex(s: str) -> bool:
    return any(c in s for c in "^$*+?[](){}|\\")
