"""A compressed-tensors folder -> a transformers model whose quantized Linears hold only integers.

The model is built with its parameters on the meta device; every tensor then comes straight from
the safetensors file, one at a time: floats become the model's parameters (in the compute dtype),
each quantized Linear's integers, scales and zero points become a PackedLinear. So memory while
loading is about the packed model plus the largest tensor, and nothing keeps a float copy of a
quantized weight. The fp32 compute path equals the dequantized reference
(`compress.quant.compressed.load_simulated`) exactly; bf16 runs the CPU weight-only kernels.

Optionally the token embedding is quantized at load (int8 per row, or 4-bit asymmetric groups
of 32, round to nearest), and a head tied to it computes on the same integers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from slimport.compress.quant import primitives as P
from slimport.compress.quant.config import QuantArgs
from slimport.errors import SlimportError, name_list
from slimport.io import pruned_heads
from slimport.io.compressed import (
    InputArgs,
    Scheme,
    Schemes,
    read_config,
    read_linear,
    schemes_from,
)
from slimport.io.hf import model_for_config, set_module
from slimport.runtime.torch.packed import InputQuant, PackedEmbedding, PackedLinear, PackedWeight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# load-time embedding quantization: int8 symmetric per row, 4-bit asymmetric groups of 32
EMBEDDINGS = {
    "int8": QuantArgs(8, True, "channel"),
    "int4": QuantArgs(4, False, "group", 32),
}


def describe(s: Scheme) -> str:
    """A Linear's scheme as load_quantized's info names it: "W4 g32 asym (pack-quantized)"."""
    w, a = s.weights, s.inputs
    g = f"g{w.group_size}" if w.granularity == "group" else f"per-{w.granularity}"
    act = "" if a is None else f" A{a.bits} {'dynamic' if a.dynamic else 'static'}"
    return f"W{w.bits} {g} {'sym' if w.symmetric else 'asym'}{act} ({s.format})"


def _input_args(a: InputArgs) -> QuantArgs:
    """compressed-tensors' int8 inputs: dynamic per token, or static per tensor."""
    return QuantArgs(a.bits, a.symmetric, "token" if a.dynamic else "tensor", None, a.dynamic)


def scheme_of(folder: Path) -> tuple[dict, Schemes]:
    """(config.json, its schemes: one per config group), or a SlimportError saying what is
    unsupported."""
    config = read_config(folder)
    _, schemes = schemes_from(folder / "config.json", config["quantization_config"])
    return config, schemes


class Checkpoint:
    """The tensors of model.safetensors (or its shards), each read once, when asked for, into
    memory of its own (io.safetensors' positioned reads: no whole-file mmap, which would both
    grow RSS by the file while loading and leave kernels reading a file mapping)."""

    def __init__(self, folder: Path) -> None:
        from slimport.io import safetensors

        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if not (index.is_file() or single.is_file()):
            raise SlimportError(f"{folder}: no model.safetensors (or shard index)")
        self.path = folder
        self._ckpt = safetensors.read(index if index.is_file() else single)
        self.unread = set(self._ckpt.infos)
        self.nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    def __contains__(self, name: str) -> bool:
        return name in self._ckpt.infos

    def names(self) -> list[str]:
        return list(self._ckpt.infos)

    def take(self, name: str, what: str = "tensor") -> torch.Tensor:
        if name not in self._ckpt.infos:
            raise SlimportError(
                f"{self.path}: tensor {name!r} is missing ({what})",
                hint="the checkpoint is incomplete or was written with another scheme",
            )
        self.unread.discard(name)
        _release_freed_memory()
        return self._ckpt.load(name)

    def close(self) -> None:
        self._ckpt.close()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand the transient buffers freed so far (fp32 copies, unpacked integers) back to the OS:
    glibc keeps freed heap chunks, and after loading SmolLM2 W4 in bf16 RSS grew by 356 MB for
    116 MB of model without this, 143 MB with it (peak 449 -> 241 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init); buffers
    stay real: RoPE frequencies and position ids are computed in __init__ and absent from
    checkpoints (what accelerate's init_empty_weights(include_buffers=False) does)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_model(folder: Path, config: dict) -> nn.Module:
    from transformers.initialization import no_init_weights

    cls, hf_config = model_for_config(folder, config)
    with parameters_on_meta(), no_init_weights():  # narrower layers of a head-pruned BERT too
        return pruned_heads.apply(cls(hf_config), pruned_heads.pruned_heads(hf_config))


def _packed_linear(ckpt: Checkpoint, name: str, lin: nn.Linear, s: Scheme, dtype) -> PackedLinear:
    """The PackedLinear of quantized Linear `name` from its checkpoint tensors, checked."""
    n, k = lin.weight.shape
    q, scale, zero = read_linear(ckpt, name, (n, k), s.weights, s.format, ckpt.take)
    groups = scale.shape[-1] if scale.dim() == 2 else 1  # per tensor: one scale for every row
    zero = None if s.weights.symmetric else zero.expand(n, groups)
    weight = PackedWeight(q, scale.float().expand(n, groups), zero, s.weights.bits, dtype)
    del q
    bias = ckpt.take(f"{name}.bias", "bias").to(dtype) if lin.bias is not None else None
    inputs = None
    if s.inputs is not None:
        args = _input_args(s.inputs)
        if s.inputs.dynamic:
            inputs = InputQuant(args)
        else:
            iscale = ckpt.take(f"{name}.input_scale", "static input scale")
            izero = (
                torch.zeros(1)
                if s.inputs.symmetric
                else ckpt.take(f"{name}.input_zero_point", "input zero point")
            )
            inputs = InputQuant(args, iscale, izero)
    return PackedLinear(weight, bias, inputs)


def _assign(model: nn.Module, name: str, value: torch.Tensor, ckpt: Checkpoint, dtype) -> None:
    """Put a float checkpoint tensor where the model has it (its parameters are still meta)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        module = None
    slot = None
    if module is not None:
        slot = module._parameters if attr in module._parameters else None
        slot = module._buffers if slot is None and attr in module._buffers else slot
    if slot is None:
        raise SlimportError(f"{ckpt.path}: tensor {name!r} is not part of {type(model).__name__}")
    have = slot[attr]
    if have is not None and tuple(have.shape) != tuple(value.shape):
        raise SlimportError(f"{ckpt.path}: {name} has shape {list(value.shape)}, {type(model).__name__} needs {list(have.shape)}")  # fmt: skip
    if value.is_floating_point():
        value = value.to(dtype)
    if slot is module._parameters:
        value = nn.Parameter(value, requires_grad=False)
    slot[attr] = value


def _embedding_name(model: nn.Module) -> str | None:
    emb = model.get_input_embeddings()
    return next((n for n, m in model.named_modules() if m is emb), None)


def _quantize_embedding(model, name: str, weight: torch.Tensor, how: str, dtype) -> PackedWeight:
    """Replace the token embedding by a PackedEmbedding quantized from `weight` (round to nearest)."""
    args = EMBEDDINGS[how]
    q, scale, zero = P.rtn(weight.float(), args)
    packed = PackedWeight(q, scale, None if args.symmetric else zero, args.bits, dtype)
    old = model.get_submodule(name)
    set_module(model, name, PackedEmbedding(packed, getattr(old, "padding_idx", None)))
    return packed


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (ties share)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _fill(model: nn.Module, ckpt: Checkpoint, schemes: Schemes, dtype, embeddings) -> list[Scheme]:
    """Every checkpoint tensor into the meta-built model, once: quantized Linears (those with a
    weight_scale) become PackedLinears, each in its config group's scheme, the rest are
    assigned (float modules stay float); ties restored; nothing left meta. Returns the schemes
    the Linears use."""
    quantized = sorted({n.rpartition(".")[0] for n in ckpt.names() if n.endswith(".weight_scale")})
    if not quantized:
        raise SlimportError(f"{ckpt.path}: compressed-tensors config, but no quantized tensors")
    modules = dict(model.named_modules())
    scheme: dict[str, Scheme] = {}
    for name in quantized:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            what = "absent" if lin is None else type(lin).__name__
            raise SlimportError(f"{ckpt.path}: {name} holds quantized tensors, but in {type(model).__name__} it is {what}, not a Linear")  # fmt: skip
        scheme[name] = schemes.of(name)
        set_module(model, name, _packed_linear(ckpt, name, lin, scheme[name], dtype))

    emb_name = _embedding_name(model) if embeddings else None
    tied_head = None
    for name in sorted(ckpt.unread):
        if name.rpartition(".")[0] in quantized:
            raise SlimportError(f"{ckpt.path}: unexpected tensor {name!r} for the {scheme[name.rpartition('.')[0]].format} scheme")  # fmt: skip
        value = ckpt.take(name)
        if emb_name is not None and name == f"{emb_name}.weight":
            tied_head = _quantize_embedding(model, emb_name, value, embeddings, dtype)
        else:
            _assign(model, name, value, ckpt, dtype)
        del value

    head = model.get_output_embeddings()
    if head is not None and isinstance(head, nn.Linear) and head.weight.is_meta:
        if not getattr(model.config, "tie_word_embeddings", False):
            raise SlimportError(f"{ckpt.path}: the output head's weight is missing and not tied")
        head_name = next(n for n, m in model.named_modules() if m is head)
        if tied_head is not None:  # the head computes on the embedding's integers
            set_module(model, head_name, PackedLinear(tied_head, None))
        else:
            head.weight = model.get_input_embeddings().weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise SlimportError(f"{ckpt.path}: tensor(s) missing from the checkpoint: {name_list(missing)}")  # fmt: skip
    return list(dict.fromkeys(scheme.values()))


def load_quantized(
    path: str | Path,
    compute_dtype: str = "float32",
    embeddings: str | None = None,
) -> tuple[nn.Module, dict]:
    """A compressed-tensors folder -> (transformers model with PackedLinear modules, info).

    compute_dtype: "float32" (exact: equals the dequantized reference) or "bfloat16" (the CPU
    int8/int4 weight-only kernels; every float tensor held in bf16). embeddings: None (as stored),
    "int8" or "int4" (quantize the token embedding at load; a tied head shares its integers).
    info: scheme, kernels per module, file_bytes, resident_bytes (parameters + buffers).
    """
    folder = Path(path)
    if compute_dtype not in DTYPES:
        raise SlimportError(f"compute_dtype {compute_dtype!r} is not supported", hint="float32 or bfloat16")  # fmt: skip
    if embeddings not in (None, *EMBEDDINGS):
        raise SlimportError(f"embeddings {embeddings!r} is not supported", hint="None, int8 or int4")  # fmt: skip
    if not folder.is_dir():
        raise SlimportError(f"{folder}: model folder not found")
    config, schemes = scheme_of(folder)
    dtype = DTYPES[compute_dtype]
    ckpt = Checkpoint(folder)
    try:
        model = _build_model(folder, config)
        used = _fill(model, ckpt, schemes, dtype, embeddings)
    finally:
        ckpt.close()
    model.config.dtype = dtype
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    info = {
        "scheme": "; ".join(describe(s) for s in used),  # one per scheme of a mixed folder
        "compute_dtype": compute_dtype,
        "embeddings": embeddings,
        "kernels": dict(Counter(m.path for m in layers)),
        "layouts": dict(Counter(m.packed.layout for m in layers)),
        "file_bytes": ckpt.nbytes,
        "resident_bytes": resident_bytes(model),
    }
    return model.eval(), info
