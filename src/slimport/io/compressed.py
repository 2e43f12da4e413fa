"""Reading `compressed-tensors` checkpoints (the format vLLM and transformers load, and what
`slimport quantize` writes): the config block, its schemes (one per config group: a budget
recipe's overrides give modules schemes of their own), each Linear's integers, scales and zero
points, and the float model they compute (`dequantized_view`).

The layout of one quantized Linear `P` is described in slimport.compress.quant.compressed, the
writer. Dequantized value = (q - zero_point) * scale, per tensor / output channel / group.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo

PACKED, INT = "pack-quantized", "int-quantized"
READABLE_FORMATS = (PACKED, INT, "naive-quantized")  # naive = int layout, older writers
PACKED_ZP = ("channel", "group")  # the zero points pack-quantized packs (not per-tensor)


@dataclasses.dataclass(frozen=True)
class WeightArgs:
    """How a checkpoint's Linear weights are quantized (the fields compress.QuantArgs shares)."""

    bits: int
    symmetric: bool
    granularity: str  # tensor | channel | group
    group_size: int | None = None


def weight_args(scheme) -> WeightArgs:
    """The weight quantization of a compressed-tensors QuantizationScheme."""
    w = scheme.weights
    return WeightArgs(
        w.num_bits, w.symmetric, w.strategy, w.group_size if w.strategy == "group" else None
    )


def ct_quantization():
    """compressed_tensors.quantization, imported when a compressed checkpoint is read: the library
    pulls in transformers (seconds), which opening any other checkpoint never needs."""
    try:
        import compressed_tensors.quantization as q
    except ImportError:  # pragma: no cover - a dependency of slimport's quantization extra
        raise SlimportError(
            "reading or writing compressed-tensors checkpoints needs the compressed-tensors package",
            hint="pip install compressed-tensors",
        ) from None
    return q


def is_compressed(config: dict | None) -> bool:
    """Whether a config.json dict describes a compressed-tensors quantized model."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def read_config(folder: Path) -> dict:
    """config.json of a compressed-tensors model folder (checked to be one)."""
    path = folder / "config.json"
    if not path.is_file():
        raise SlimportError(f"{folder}: no config.json, not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimportError(f"{path}: cannot read ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not is_compressed(config):
        found = (
            "no quantization_config"
            if not isinstance(qc, dict)
            else f"quant_method {qc.get('quant_method')!r}"
        )
        raise SlimportError(
            f"{path}: not a compressed-tensors model ({found})",
            hint="load_quantized reads folders written by save_quantized or llm-compressor",
        )
    return config


def _unsupported(path: Path, what: str):
    return SlimportError(
        f"{path}: compressed-tensors {what} is not supported",
        hint="slimport reads integer weights (3-8 bits, per tensor/channel/group) with optional "
        "int8 static per-tensor or dynamic per-token activations, in each config group",
    )


@dataclasses.dataclass(frozen=True)
class InputArgs:
    """How a checkpoint's Linear inputs are quantized at run time (int8 static or per token)."""

    bits: int
    symmetric: bool
    dynamic: bool


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one Linear of a checkpoint is stored (`format`) and computes (weights, inputs)."""

    format: str
    weights: WeightArgs
    inputs: InputArgs | None = None

    def __str__(self) -> str:
        w, a = self.weights, self.inputs
        g = f"g{w.group_size}" if w.granularity == "group" else f"per-{w.granularity}"
        act = "" if a is None else f"A{a.bits} {'dynamic' if a.dynamic else 'static'}"
        return f"W{w.bits}{act} {g} {'sym' if w.symmetric else 'asym'}"


@dataclasses.dataclass(frozen=True)
class Schemes:
    """The config groups of a checkpoint: (targets, scheme) each. A module takes the group that
    names it exactly, else one whose "re:" pattern matches it, else the "Linear" class target:
    compressed-tensors' order (utils.match.match_targets), so we compute what vLLM computes."""

    path: Path
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]

    def of(self, name: str) -> Scheme:
        """The scheme of quantized Linear `name` (a SlimportError when no group targets it)."""
        ranks = (
            lambda t: t == name,
            lambda t: t.startswith("re:") and re.match(t[3:], name) is not None,
            lambda t: t == "Linear",
        )
        for matches in ranks:
            for targets, scheme in self.groups:
                if any(matches(t) for t in targets):
                    return scheme
        raise SlimportError(
            f"{self.path}: {name} holds quantized tensors, but no config group targets it "
            f"(targets: {', '.join(t for ts, _ in self.groups for t in ts)})"
        )

    @property
    def distinct(self) -> list[Scheme]:
        return list(dict.fromkeys(s for _, s in self.groups))

    def __str__(self) -> str:
        return "; ".join(str(s) for s in self.distinct)


def _scheme(path: Path, key: str, s, default_format: str | None) -> Scheme:
    """One config group checked to be what slimport computes; errors name the group's modules."""
    where = f" (config group {key}: {', '.join(s.targets)})"
    fmt = s.format or default_format
    if fmt not in READABLE_FORMATS:
        raise _unsupported(path, f"format {fmt!r}{where}")
    w, a = s.weights, s.input_activations
    if (
        w is None
        or w.type != "int"
        or not 3 <= w.num_bits <= 8
        or w.strategy not in ("tensor", "channel", "group")
    ):
        raise _unsupported(path, f"weight scheme {w!r}{where}")
    if s.output_activations is not None:
        raise _unsupported(path, f"output activation quantization{where}")
    inputs = None
    if a is not None:
        static = a.strategy == "tensor" and not a.dynamic
        dynamic = a.strategy == "token" and a.dynamic is True
        if a.type != "int" or a.num_bits != 8 or not (static or dynamic):
            raise _unsupported(path, f"input activation scheme {a!r}{where}")
        inputs = InputArgs(a.num_bits, a.symmetric, bool(a.dynamic))
    return Scheme(fmt, weight_args(s), inputs)


def schemes_from(path: Path, qc: dict):
    """Validate the config block and return (library QuantizationConfig, its Schemes)."""
    q = ct_quantization()
    try:
        ct = q.QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic's ValidationError, or the library's own ValueErrors
        raise SlimportError(f"{path}: invalid quantization_config ({e})") from None
    sparse = qc.get("sparsity_config") or {}
    if sparse and (not isinstance(sparse, dict) or sparse.get("format") != "dense"):
        fmt = sparse.get("format") if isinstance(sparse, dict) else sparse
        raise SlimportError(
            f"{path}: compressed-tensors sparsity format {fmt!r} is not supported",
            hint="slimport reads pruned models stored dense (sparsity_config format 'dense', "
            "what `slimport prune` and llm-compressor with compressed-tensors >= 0.15 write); "
            "the bitmask formats were removed from compressed-tensors and transformers",
        )
    if qc.get("transform_config"):
        raise _unsupported(path, "transforms")
    if ct.kv_cache_scheme is not None:
        raise _unsupported(path, "KV-cache quantization")
    if ct.quantization_status != "compressed":
        raise _unsupported(
            path, f"quantization_status {ct.quantization_status!r} (only compressed)"
        )
    if not ct.config_groups:
        raise _unsupported(path, "quantization_config without config_groups")
    groups = tuple(
        (tuple(s.targets), _scheme(path, key, s, ct.format)) for key, s in ct.config_groups.items()
    )
    return ct, Schemes(path, groups)


def read_linear(
    ckpt: Checkpoint,
    name: str,
    shape: tuple[int, int],
    wargs: WeightArgs,
    fmt: str,
    take: Callable[[str, str], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers, scale, zero point) of the quantized Linear `name` with weight `shape`, checked
    against the scheme; `take(tensor name, what)` reads a checkpoint tensor."""
    ct_quantization()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out_f, in_f = shape
    if wargs.granularity == "group" and in_f % wargs.group_size:
        raise SlimportError(
            f"{name}: {in_f} input features are not a multiple of group size {wargs.group_size}"
        )
    if fmt == PACKED:
        packed = take(f"{name}.weight_packed", "packed weight")
        stored = take(f"{name}.weight_shape", "weight shape").tolist()
        if stored != [out_f, in_f] or packed.dtype != torch.int32:
            raise SlimportError(
                f"{ckpt.path}: {name}.weight_packed is {stored} {packed.dtype}, the model needs [{out_f}, {in_f}] int32"
            )
        q = unpack_from_int32(packed, wargs.bits, torch.Size(stored))
    else:
        q = take(f"{name}.weight", "int8 weight")
        if list(q.shape) != [out_f, in_f] or q.dtype != torch.int8:
            raise SlimportError(
                f"{ckpt.path}: {name}.weight is {list(q.shape)} {q.dtype}, the model needs [{out_f}, {in_f}] int8"
            )
    scale = take(f"{name}.weight_scale", "weight scales")
    groups = {"tensor": None, "channel": 1, "group": in_f // (wargs.group_size or 1)}[
        wargs.granularity
    ]
    want = [1] if groups is None else [out_f, groups]
    if list(scale.shape) != want:
        raise SlimportError(
            f"{ckpt.path}: {name}.weight_scale has shape {list(scale.shape)}, expected {want}"
        )
    if wargs.symmetric:
        zero = torch.zeros(want, dtype=torch.int8)
    else:
        zero = take(f"{name}.weight_zero_point", "weight zero points")
        if fmt == PACKED and wargs.granularity in PACKED_ZP:
            zero = unpack_from_int32(zero, wargs.bits, torch.Size(want), packed_dim=0)
        if list(zero.shape) != want:
            raise SlimportError(
                f"{ckpt.path}: {name}.weight_zero_point has shape {list(zero.shape)}, expected {want}"
            )
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float weight [out, in] of integers with scales/zero points shaped [1] (per tensor) or
    [out, groups] (per channel: one group): (q - zero) * scale, in float32."""
    q, scale, zero = q.float(), scale.float(), zero.float()
    if scale.dim() == 1:  # per tensor
        g, s, z = q.reshape(1, 1, -1), scale.reshape(1, 1, 1), zero.reshape(1, 1, 1)
    else:
        rows, groups = scale.shape
        g = q.reshape(rows, groups, -1)
        s, z = scale.reshape(rows, groups, 1), zero.reshape(rows, groups, 1)
    return ((g - z) * s).reshape(q.shape)


def _nbytes(info: TensorInfo) -> int:
    n = info.dtype.itemsize
    for d in info.shape:
        n *= d
    return n


@dataclasses.dataclass(frozen=True)
class IntLinear:
    """One quantized Linear of a compressed checkpoint, for runtimes that compute with its
    integers instead of the dequantized weight: `read()` gives (q, scale, zero) as
    `read_linear` checks them; `input_qparams()` the static input (scale, zero), [1] each."""

    name: str
    shape: tuple[int, int]
    weights: WeightArgs
    inputs: InputArgs | None
    read: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    input_qparams: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    stored_bytes: int = 0  # integers, scales and zero points as the file holds them

    @property
    def scheme(self) -> str:
        return str(Scheme("", self.weights, self.inputs))


def dequantized_view(ckpt: Checkpoint) -> Checkpoint:
    """A compressed-tensors checkpoint read as the float model it computes, for every path that
    reads float checkpoints (MindSpore, GGUF/ONNX export, verify): each quantized Linear's
    `weight` is its dequantized integers (exactly QuantLinear.weight), made lazily when read;
    the integer, scale and zero-point tensors are consumed. `quantized` keeps each Linear's
    integers for runtimes that compute with them. Quantized activations have no float-weight
    equivalent: such a view says so in `metadata["quantized_activations"]`, and the hub loader
    refuses it unless its caller computes with the integers (convert.loader.load)."""
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    _, schemes = schemes_from(folder / "config.json", ckpt.config["quantization_config"])
    suffix = ".weight_scale"
    linears = [n[: -len(suffix)] for n in ckpt.infos if n.endswith(suffix)]
    if not linears:
        raise SlimportError(f"{folder}: compressed-tensors config, but no quantized tensors")
    scheme = {n: schemes.of(n) for n in linears}  # each Linear its own group's scheme
    kinds = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")  # fmt: skip
    parts = {f"{n}.{k}" for n in linears for k in kinds}
    infos = {k: v for k, v in ckpt.infos.items() if k not in parts}
    for n in linears:
        if scheme[n].format == PACKED:
            if f"{n}.weight_shape" not in ckpt.infos:
                raise SlimportError(f"{ckpt.path}: tensor {n + '.weight_shape'!r} is missing")
            shape = tuple(ckpt.load(f"{n}.weight_shape").tolist())
        else:
            shape = tuple(ckpt.infos[f"{n}.weight"].shape)
        infos[f"{n}.weight"] = TensorInfo(shape, torch.float32)
    shapes = {f"{n}.weight": (n, infos[f"{n}.weight"].shape) for n in linears}

    def take(name: str, what: str) -> torch.Tensor:
        if name not in ckpt.infos:
            raise SlimportError(
                f"{ckpt.path}: tensor {name!r} is missing ({what})",
                hint="the checkpoint is incomplete or was written with a different scheme",
            )
        return ckpt.load(name)

    def read(n: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = scheme[n]
        return read_linear(ckpt, n, shapes[f"{n}.weight"][1], s.weights, s.format, take)

    def load(name: str) -> torch.Tensor:
        return dequantize(*read(shapes[name][0])) if name in shapes else ckpt.load(name)

    def input_qparams(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        scale = take(f"{n}.input_scale", "static input scale").float().reshape(1)
        zero = (
            torch.zeros(1)
            if scheme[n].inputs.symmetric
            else take(f"{n}.input_zero_point", "static input zero point").float().reshape(1)
        )
        return scale, zero

    quantized = {
        n: IntLinear(
            n,
            shapes[f"{n}.weight"][1],
            s.weights,
            s.inputs,
            lambda n=n: read(n),
            (lambda n=n: input_qparams(n))
            if s.inputs is not None and not s.inputs.dynamic
            else None,
            sum(_nbytes(ckpt.infos[f"{n}.{k}"]) for k in kinds if f"{n}.{k}" in ckpt.infos),
        )
        for n, s in scheme.items()
    }
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    used = list(dict.fromkeys(scheme.values()))

    def what(w: WeightArgs) -> str:
        return f"W{w.bits} " + (f"g{w.group_size}" if w.granularity == "group" else f"per-{w.granularity}")  # fmt: skip

    formats = ", ".join(dict.fromkeys(s.format for s in used))
    weights = ", ".join(dict.fromkeys(what(s.weights) for s in used))
    metadata = {**ckpt.metadata, "dequantized_from": f"compressed-tensors {formats} ({weights})",
                "ignored": list(ckpt.config["quantization_config"].get("ignore") or [])}  # fmt: skip
    acts = dict.fromkeys(
        f"{'dynamic' if s.inputs.dynamic else 'static'} int{s.inputs.bits} inputs"
        for s in used
        if s.inputs is not None
    )
    if acts:
        metadata["quantized_activations"] = ", ".join(acts)
    return dataclasses.replace(
        ckpt, infos=infos, loader=load, config=config, metadata=metadata, quantized=quantized
    )
