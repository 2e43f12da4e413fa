"""What to quantize and how: `QuantizationConfig`, readable from kwargs, a YAML recipe or the
seeds' dict form, and validated once here so every later stage can trust it."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from slimport.arch.layout import output_heads
from slimport.compress.fields import check_field_types
from slimport.compress.modifiers import (
    AWQConfig,
    GPTQConfig,
    Modifier,
    SmoothQuantConfig,
    StaticInputsConfig,
    check_order,
    modifier,
    parse_modifiers,
)
from slimport.errors import SlimportError
from slimport.io.formats import GGUF_LAYOUTS, scheme_fits

# the flat `method` spellings the CLI offers (any "+"-joined registered modifiers also parse):
# awq+gptq = AWQ's activation-aware channel scales, then GPTQ's error-compensating rounding
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
OBSERVERS = ("min_max", "ema_min_max", "percentile", "mse", "kl")
GRANULARITIES = ("tensor", "channel", "group")
ACTIVATIONS = (None, "static", "dynamic")
# llm-compressor's (and compressed-tensors') names for our options, read in recipes
ALIASES = {
    "ignore": "protect", "num_bits": "bits", "strategy": "granularity", "scheme": "bits",
    "num_calibration_samples": "num_samples", "max_seq_length": "seq_len",
}  # fmt: skip
# llm-compressor's preset schemes (compressed_tensors.quantization.quant_scheme) in our options
SCHEMES = {
    "W4A16": {"bits": 4, "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"bits": 4, "group_size": 128, "symmetric": False},
    "W8A16": {"bits": 8, "granularity": "channel", "symmetric": True},
    "W8A8": {"bits": 8, "granularity": "channel", "symmetric": True, "activations": "dynamic",
             "act_symmetric": True},
}  # fmt: skip
OVERRIDE_KEYS = ("bits", "group_size", "granularity", "symmetric")  # of one module's weights
RECIPE_MAX_BYTES = 1 << 20  # a recipe is a few lines; a bigger file is not one
# what a default run leaves in full precision: every family's output heads (arch/layout.py),
# whose errors nothing downstream fixes
DEFAULT_PROTECT = tuple(rf"(^|\.){re.escape(h)}$" for h in output_heads())


@dataclass(frozen=True)
class QuantArgs:
    """How one kind of tensor (weights, or a layer's input activations) is quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # tensor | channel | group | token (activations, dynamic)
    group_size: int | None = None
    dynamic: bool = False
    # scales (and asymmetric minimums -zero*scale) that are float16 values, so GGUF's Q8_0 /
    # Q4_0 / Q4_1 blocks hold the integers exactly (primitives.qparams)
    fp16_scales: bool = False


@dataclass
class QuantizationConfig:
    """A quantization recipe: one weight scheme (+ optional 8-bit inputs) and the algorithms that
    reach it, as an ordered list of `modifiers` (modifiers.py).

    The algorithms are written either as typed configs, `modifiers=[AWQConfig(), GPTQConfig()]`,
    or in the flat spelling of YAML recipes and the CLI: `method: awq+gptq`, `gptq: {damp: ...}`,
    `awq: {...}`, `smoothquant: ALPHA`. Both give the same config; after construction both are
    filled in and agree.

    bits 16 casts to `dtype16`; 8, 4 quantize weights (3 with GPTQ). `symmetric` None = the
    measured best: asymmetric below 8 bits (SmolLM2 RTN W4 g64 WikiText-2 perplexity 47.8 vs
    53.1 symmetric), symmetric at 8. `activations` adds 8-bit input quantization to every
    quantized Linear: "static" (per-tensor scale calibrated by `observer`) or "dynamic"
    (per-token at run time).
    """

    bits: int = 8
    method: str | None = None  # flat spelling of the modifiers; "rtn" when nothing is given
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool | None = None
    activations: str | None = None
    act_bits: int = 8
    # activations default to an asymmetric grid: inputs after GELU/SiLU are nearly one-sided, and a
    # zero point doubles their resolution (MiniLM SST-2 W8A8 min_max: agreement 98.05% -> 98.97%)
    act_symmetric: bool | None = False  # None: as `symmetric`
    observer: str = "min_max"  # activation ranges (static)
    weight_observer: str = "min_max"  # min_max, or mse to search a clipping range per row/group
    observer_options: dict = field(default_factory=dict)  # decay, percentile, bins, grid ...
    smoothquant: float | None = None  # flat spelling of SmoothQuantConfig(alpha)
    protect: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECT))
    # mixed precision: {module-name regex: {bits, group_size, granularity, symmetric}}, the first
    # match wins and what it leaves out is the recipe's (a new `bits` alone takes that width's
    # default symmetry); a module kept in float goes in `protect`. `slimport sensitivity
    # --budget` writes these.
    overrides: dict = field(default_factory=dict)
    dtype16: str = "float16"
    # flat spelling of the options of GPTQConfig / AWQConfig
    gptq: dict | None = None
    awq: dict | None = None
    modifiers: list | None = None
    # weight scales GGUF holds exactly (float16 d and Q4_1 minimum): `convert --to gguf` then
    # writes the integers as they are (needs a scheme a GGUF block type fits, io.gguf_blocks)
    gguf_compatible: bool = False
    # calibration data
    calib_data: str | None = None
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.calib_data, os.PathLike):
            self.calib_data = os.fspath(self.calib_data)  # kept as text: the recipe is JSON
        check_field_types(QuantizationConfig, vars(self))
        if self.group_size is not None and self.granularity == "channel":
            self.granularity = "group"
        if self.symmetric is None:
            self.symmetric = self.bits >= 8
        self._resolve_modifiers()
        self.validate()

    def _resolve_modifiers(self) -> None:
        """Typed modifiers <-> the flat spelling. Option dicts are checked even when their
        algorithm is not used, so a misspelt knob (`gptq: {dmap: 0.1}`) is never ignored."""
        knobs = {"gptq": GPTQConfig, "awq": AWQConfig}
        parsed = {
            k: c.parse(getattr(self, k)) for k, c in knobs.items() if getattr(self, k) is not None
        }
        if self.modifiers is None:
            mods: list[Modifier] = []
            if self.smoothquant is not None:
                mods.append(SmoothQuantConfig.parse({"alpha": self.smoothquant}))
            mods += [parsed.get(n) or modifier(n) for n in (self.method or "rtn").split("+")]
            given: dict = {}
        else:
            mods = parse_modifiers(self.modifiers)
            given = {"method": self.method, "smoothquant": self.smoothquant, **parsed}
        if not any(m.rounds or m.prunes for m in mods):
            mods.append(modifier("rtn"))  # AWQ alone: scales, then round to nearest
        check_order(mods)
        self.modifiers = mods
        names = [m.name for m in mods if not isinstance(m, SmoothQuantConfig)]
        if len(names) > 1 and names[-1] == "rtn" and not any(m.prunes for m in mods):
            names.pop()  # (a pruning method alone keeps its weights float: its rtn stays named)
        derived: dict = {
            "method": "+".join(names),
            "smoothquant": next((m.alpha for m in mods if isinstance(m, SmoothQuantConfig)), None),
            **{k: next((m for m in mods if isinstance(m, c)), None) for k, c in knobs.items()},
        }
        clash = [
            k for k, v in given.items()
            if v is not None and (derived[k] is not None or k not in knobs) and v != derived[k]
        ]  # fmt: skip
        if clash:
            raise SlimportError(
                f"quantization option(s) {', '.join(clash)} disagree with `modifiers`",
                hint="give the algorithms one way: `modifiers`, or method/gptq/awq/smoothquant",
            )
        self.method, self.smoothquant = derived["method"], derived["smoothquant"]
        for k, c in knobs.items():
            setattr(self, k, (derived[k] or parsed.get(k) or c()).options())

    # ---- views used by the quantizers
    @property
    def weights(self) -> QuantArgs:
        return QuantArgs(
            self.bits, self.symmetric, self.granularity, self.group_size,
            fp16_scales=self.gguf_compatible,
        )  # fmt: skip

    def weights_for(self, module: str) -> QuantArgs:
        """The weight scheme of the Linear `module` (full name): its override's, or the recipe's."""
        for pattern, o in self.overrides.items():
            if re.search(pattern, module):
                return self._override_args(o)
        return self.weights

    def _override_args(self, o: dict) -> QuantArgs:
        bits = o.get("bits", self.bits)
        symmetric = o.get("symmetric", bits >= 8 if "bits" in o else self.symmetric)
        if o.get("group_size") is not None:
            granularity, group = o.get("granularity", "group"), o["group_size"]
        else:
            granularity = o.get("granularity", self.granularity)
            group = self.group_size if granularity == "group" else None
        return QuantArgs(bits, symmetric, granularity, group, fp16_scales=self.gguf_compatible)

    @property
    def inputs(self) -> QuantArgs | None:
        if self.activations is None:
            return None
        sym = self.symmetric if self.act_symmetric is None else self.act_symmetric
        if self.activations == "dynamic":
            return QuantArgs(self.act_bits, sym, "token", None, dynamic=True)
        return QuantArgs(self.act_bits, sym, "tensor", None)

    @property
    def plan(self) -> list[Modifier]:
        """What the pipeline runs on every block, in order: the modifiers, then static input
        calibration when the inputs are quantized statically."""
        return [*self.modifiers, *([StaticInputsConfig()] if self.activations == "static" else [])]

    @property
    def quantizes(self) -> bool:
        """Whether the weights are rounded (a pruning-only recipe keeps them float)."""
        return any(m.rounds for m in self.modifiers)

    @property
    def pruning(self):
        """The recipe's pruning modifier, or None."""
        return next((m for m in self.modifiers if m.prunes), None)

    @property
    def needs_calibration(self) -> bool:
        return any(m.needs_data for m in self.plan)

    def is_protected(self, name: str) -> bool:
        return any(p and re.search(p, name) for p in self.protect)  # '' (`--protect ''`): none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modifiers"] = [{m.name: m.options()} for m in self.modifiers]
        return d

    # ---- construction
    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        """Our own keys, or the seeds' form {"quant_mode": "8bit", "calib_method": ...}."""
        d = ours(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            named = [f"{k} (slimport: {ALIASES[k]})" if k in ALIASES else str(k) for k in unknown]
            raise SlimportError(
                f"unknown quantization option(s): {', '.join(named)}",
                hint="known: " + ", ".join(sorted(known)),
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantizationConfig:
        path = Path(path)
        try:
            return cls.from_dict(read_recipe(path))
        except SlimportError as e:
            raise SlimportError(f"{path}: {e.message}", hint=e.hint) from None

    def validate(self) -> None:
        def bad(option: str, why: str, hint: str | None = None):
            raise SlimportError(f"quantization option {option}: {why}", hint=hint)

        if self.bits not in (16, 8, 4, 3):
            bad("bits", f"{self.bits} is not supported", "one of 16, 8, 4, 3")
        if self.activations and not self.quantizes:
            bad("activations", f"{self.method} only prunes: add a rounding method (gptq, rtn)")
        if self.bits == 3 and not any(m.error_feedback for m in self.modifiers):
            bad("bits", "3-bit weights need method gptq (RTN/AWQ lose too much at 3 bits)")
        if self.bits == 16 and (
            self.method != "rtn" or self.activations or self.smoothquant is not None
        ):
            bad("bits", "16-bit is a plain cast: no method, activations or smoothquant")
        if self.granularity not in GRANULARITIES:
            bad(
                "granularity", f"unknown {self.granularity!r}", "one of " + ", ".join(GRANULARITIES)
            )
        if (self.granularity == "group" and not self.group_size) or (
            self.group_size is not None and self.group_size <= 0
        ):
            bad(
                "group_size",
                f"{self.group_size}: per-group quantization needs a positive group_size",
            )
        if self.activations not in ACTIVATIONS:
            bad("activations", f"unknown {self.activations!r}", "static or dynamic")
        if self.activations and self.act_bits != 8:
            bad("act_bits", f"{self.act_bits}-bit activations are not supported", "use 8")
        if self.observer not in OBSERVERS:
            bad("observer", f"unknown {self.observer!r}", "one of " + ", ".join(OBSERVERS))
        if self.dtype16 not in ("float16", "bfloat16"):
            bad("dtype16", f"unknown {self.dtype16!r}", "float16 or bfloat16")
        if self.num_samples <= 0 or self.seq_len <= 0:
            bad("num_samples/seq_len", "must be positive")
        if self.weight_observer not in ("min_max", "mse"):
            bad("weight_observer", f"unknown {self.weight_observer!r}", "min_max or mse")
        fits = scheme_fits(self.bits, self.symmetric, self.granularity, self.group_size)
        if self.gguf_compatible and (self.activations or not fits):
            g = f"g{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
            act = " with quantized activations" if self.activations else ""
            scheme = f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}{act}"
            bad("gguf_compatible", f"no GGUF block type holds {scheme}",
                "weight-only, groups of a multiple of 32 (or per channel): " + GGUF_LAYOUTS)  # fmt: skip
        for p in self.protect:
            try:
                re.compile(p)
            except re.error as e:
                bad("protect", f"{p!r} is not a valid pattern ({e})")
        self._validate_overrides(bad)

    def _validate_overrides(self, bad) -> None:
        hint = "overrides: {'model\\.layers\\.0\\.': {bits: 8, granularity: channel}}"
        for p, o in self.overrides.items():
            where = f"overrides[{p!r}]"
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                bad("overrides", f"{p!r} is not a valid module pattern ({e})", hint)
            if not isinstance(o, dict) or not o.keys() <= set(OVERRIDE_KEYS):
                bad(where, f"{o!r}: give a mapping of " + ", ".join(OVERRIDE_KEYS), hint)
            check_field_types(QuantizationConfig, o, f"quantization option {where}")
            w = self._override_args(o)
            if w.bits not in (8, 4, 3):
                bad(where, f"bits {w.bits}: 8, 4 or 3 (a float module goes in `protect`)")
            if w.bits == 3 and not any(m.error_feedback for m in self.modifiers):
                bad(where, "3-bit weights need method gptq")
            if w.granularity not in GRANULARITIES or (
                w.granularity == "group" and not (w.group_size and w.group_size > 0)
            ):
                bad(where, f"granularity {w.granularity} with group_size {w.group_size}",
                    "tensor, channel, or group with a positive group_size")  # fmt: skip
            if self.gguf_compatible and not scheme_fits(
                w.bits, w.symmetric, w.granularity, w.group_size
            ):
                bad(where, "no GGUF block type holds this scheme", GGUF_LAYOUTS)


def ours(d: dict) -> dict:
    """A recipe mapping in our keys (the seeds' form and llm-compressor's names translated);
    unset options stay unset."""
    return _from_seed_form(dict(d)) if "quant_mode" in d else _from_llm_compressor(dict(d))


def _from_llm_compressor(d: dict) -> dict:
    """llm-compressor's spellings (ALIASES, SCHEMES) as ours; an option given both ways is an
    error, as two values for one option would be."""
    out = {k: v for k, v in d.items() if k not in ALIASES}
    for key in [k for k in d if k in ALIASES]:
        value, ours_key = d[key], ALIASES[key]
        where = f"quantization option {key} (slimport: {ours_key})"
        if key == "scheme":
            if str(value).upper() not in SCHEMES:
                raise SlimportError(f"{where}: unknown scheme {value!r}", hint="one of " + ", ".join(SCHEMES))  # fmt: skip
            given = SCHEMES[str(value).upper()]
        elif key == "ignore":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise SlimportError(f"{where}: {value!r} is not a list of module names")
            # llm-compressor: a module name, or "re:" + a regex; ours: regexes
            given = {"protect": [n[3:] if n.startswith("re:") else rf"(^|\.){re.escape(n)}$" for n in value]}  # fmt: skip
        else:
            given = {ours_key: value}
        clash = sorted(k for k in given if k in out)
        if clash:
            raise SlimportError(f"{where}: {', '.join(clash)} given twice", hint="give each option once")  # fmt: skip
        out.update(given)
    return out


def read_recipe(path: str | Path) -> dict:
    """The option mapping of a YAML recipe (under `quantization:`, or at the top)."""
    data = _recipe_document(path)
    if "quantization" in data:
        data = data["quantization"]
    if not isinstance(data, dict):
        raise SlimportError(f"{path}: `quantization:` is not a mapping of options")
    if isinstance(data.get("calib_data"), str) and not Path(data["calib_data"]).is_absolute():
        # the recipe's own folder, so a recipe works from any working directory
        data = {**data, "calib_data": os.path.normpath(Path(path).parent / data["calib_data"])}
    return data


def read_qat_section(path: str | Path) -> dict | None:
    """The `qat:` mapping beside `quantization:` in a YAML recipe (QATSettings fields), or None."""
    data = _recipe_document(path)
    qat = data.get("qat") if "quantization" in data else None
    if qat is not None and not isinstance(qat, dict):
        raise SlimportError(f"{path}: `qat:` is not a mapping of options", hint="qat: {steps: 200}")
    return qat


def _recipe_document(path: str | Path) -> dict:
    """A YAML recipe's whole mapping, checked: a regular file under 1 MB, no aliases, and only
    `qat:` beside `quantization:`."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        """A recipe needs no YAML aliases, and nested ones expand exponentially when anything
        walks the result (the billion laughs): refused while parsing, before it is built."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(
                    f"line {event.start_mark.line + 1}: alias *{event.anchor}: YAML aliases are "
                    "not allowed in a recipe; write the value out"
                )
            return super().compose_node(parent, index)

    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else None  # a FIFO would block forever
        if size is None or size > RECIPE_MAX_BYTES:
            why = "not a regular file" if size is None else f"{size} bytes, over 1 MB"
            raise SlimportError(f"{path}: cannot read the recipe ({why})")
        data = yaml.load(path.read_text(), Loader=NoAliases)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise SlimportError(f"{path}: cannot read the recipe ({why[:300]})") from None
    if not isinstance(data, dict):
        raise SlimportError(f"{path}: a recipe is a mapping of options, got {type(data).__name__}")
    if "quantization" in data:
        other = sorted(map(str, set(data) - {"quantization", "qat"}))
        if other:
            raise SlimportError(
                f"{path}: unknown top-level key(s) {', '.join(other)} beside `quantization:`",
                hint="put every option under `quantization:` (and QAT's under `qat:`)",
            )
    return data


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
