"""Writing GGUF files (llama.cpp's format): model.gguf with the config, general.* and tokenizer.*
metadata llama.cpp reads. Reading is slimport.io.gguf.

Writing uses `gguf.GGUFWriter` in its streaming mode: tensor infos from the planned shapes first,
then one `compute()` at a time through `write_tensor_data`, so peak memory is one tensor.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from slimport.errors import SlimportError, name_list
from slimport.io.formats import GGUF_TYPES
from slimport.io.gguf import gguf_package
from slimport.io.gguf_blocks import BLOCK, check_fits, encode, scheme_name
from slimport.io.gguf_sidecar import read_sidecar
from slimport.io.gguf_tokenizer import gguf_tokenizer_from_hf

# source metadata we never copy: recomputed for the new file, or describing the old one's layout
_NOT_COPIED = (
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
)


def write_model(folder: Path, tensors: list, job, progress=None) -> list[str]:
    """Stream `tensors` (planned, in llama.cpp names) into folder/model.gguf."""
    gguf = gguf_package()
    Q = gguf.GGMLQuantizationType
    choice = job.options.get("gguf_type")
    requantize = bool(job.options.get("gguf_requantize"))
    if choice is not None and choice not in GGUF_TYPES:
        raise SlimportError(
            f"unknown --gguf-type {choice!r}", hint="one of: " + ", ".join(GGUF_TYPES)
        )
    has_output = any(t.name == "output.weight" for t in tensors)
    quantized = {f"{n}.weight" for n in job.source.quantized}
    plan = [(t, *_tensor_type(t, choice, requantize, has_output, bool(quantized), Q)) for t in tensors]  # fmt: skip
    job.notes += _plan_notes(plan, choice, quantized)
    meta, vtypes = _metadata(job, plan, gguf)
    arch = meta.pop("general.architecture", None)
    if not arch:
        raise SlimportError(
            f"--to gguf: {job.family.name} config_to['gguf'] gave no general.architecture"
        )
    writer = gguf.GGUFWriter(folder / "model.gguf", arch)
    for key, value in meta.items():
        _add_kv(writer, key, value, vtypes.get(key), gguf)
    for t, qtype, _ in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(t.shape, dtype=np.int64)) // block * type_size
        writer.add_tensor_info(t.name, t.shape, np.float32, nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        requantized: list[tuple[str, str]] = []  # (tensor, why its integers did not fit)
        for t, qtype, exact in plan:
            data = _integer_blocks(t, qtype, requantize, requantized) if exact else None
            if data is None:
                data = _encode(_computed(t), qtype, Q, gguf)
            writer.write_tensor_data(data)
            if progress:
                progress(int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize)
    finally:
        writer.close()
    if requantized:
        names = [n for n, _ in requantized]
        job.notes.append(f"{len(names)} quantized Linear weight(s) requantized by gguf-py "
                         f"(--gguf-requantize; {requantized[0][1]}): {name_list(names)}")  # fmt: skip
    return ["model.gguf"]


def _computed(t) -> torch.Tensor:
    value = t.compute()
    if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
        raise SlimportError(
            f"tensor {t.name!r}: planned {list(t.shape)} {t.dtype}, got {list(value.shape)} {value.dtype}"
        )
    return value


def _tensor_type(
    t, choice: str | None, requantize: bool, has_output: bool, quantized_model: bool, Q
) -> tuple:
    """(ggml type, from its integers?) of a planned tensor, as llama.cpp chooses: 1-D tensors
    (norms, biases) F32; 2-D ones the requested type, by default the source precision (bf16
    stays BF16: never silently fp16). A quantized Linear's integers are written as they are
    (by default as the type its scheme maps to); the float tensors of a quantized model keep
    their precision, so the file computes what the model computes."""
    if len(t.shape) == 1 or not t.dtype.is_floating_point:
        return Q.F32, False
    lin = t.quantized
    if lin is not None and choice not in ("f32", "f16"):
        try:
            # per tensor: a mixed-precision folder's Linears each get their own scheme's type
            where = f"{lin.name} (GGUF {t.name})"
            return Q[check_fits(where, lin.weights, t.shape[-1], choice).upper()], True
        except SlimportError:
            if not (requantize and choice):
                raise
        return _float_type(t, choice, has_output, Q), False
    if choice is None or (lin is None and quantized_model):
        return {torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(t.dtype, Q.F32), False
    return _float_type(t, choice, has_output, Q), False


def _float_type(t, choice: str, has_output: bool, Q):
    """llama.cpp's type for a float 2-D tensor asked to be `choice`. Rows not a whole number of
    blocks fall back to F16 (convert_hf_to_gguf's fallback). For Q4_0/Q4_1 the output head (the
    embedding when there is no output.weight) is Q8_0: llama-quantize's choice when its rows
    are no multiple of 256 (Q6_K otherwise, which gguf-py cannot write)."""
    qtype = Q[choice.upper()]
    if qtype in (Q.Q4_0, Q.Q4_1) and (
        t.name == "output.weight" or (t.name == "token_embd.weight" and not has_output)
    ):
        qtype = Q.Q8_0
    if qtype not in (Q.F32, Q.F16) and t.shape[-1] % BLOCK:
        return Q.F16
    return qtype


def _integer_blocks(t, qtype, requantize: bool, requantized: list) -> np.ndarray | None:
    """The blocks of a quantized Linear's own integers; None (then requantized from its float
    weight) when they do not fit exactly and the user allowed requantizing."""
    lin = t.quantized
    try:
        return encode(t.name, *lin.read(), lin.weights.bits, qtype.name.lower())
    except SlimportError as e:
        if not requantize:
            raise
        requantized.append((t.name, e.message.split(", so")[0]))
        return None


def _plan_notes(plan, choice: str | None, quantized: set[str]) -> list[str]:
    """What the report says about a quantized model's Linears: which kept their integers."""
    # one note per scheme: a mixed-precision folder's W4 and W8 Linears become different types
    by_scheme: dict[str, Counter] = {}
    for t, q, e in plan:
        if e:
            by_scheme.setdefault(scheme_name(t.quantized.weights), Counter())[q.name] += 1
    notes = []
    for scheme, exact in by_scheme.items():
        kinds = ", ".join(f"{n} {k}" for k, n in exact.items())
        notes.append(f"{sum(exact.values())} quantized Linear weight(s) written from their {scheme} integers as {kinds}")  # fmt: skip
    asked = choice in ("f32", "f16")
    requantized = [t.name for t, q, e in plan if t.quantized is not None and not e and not asked]
    if requantized:
        notes.append(f"{len(requantized)} quantized Linear weight(s) requantized by gguf-py (--gguf-requantize): {name_list(requantized)}")  # fmt: skip
    floats = [t.name for t, _, e in plan if not e and set(t.sources) & quantized and (asked or t.quantized is None)]  # fmt: skip
    if floats:
        why = (
            f"--gguf-type {choice}"
            if asked
            else "their GGUF layout is more than the checkpoint's rows reordered"
        )
        notes.append(f"{len(floats)} quantized Linear weight(s) written as their dequantized float weights ({why}): {name_list(floats)}")  # fmt: skip
    return notes


def _encode(value: torch.Tensor, qtype, Q, gguf) -> np.ndarray:
    value = value.detach().contiguous()
    if qtype == Q.F32:
        return value.to(torch.float32).numpy()
    if qtype == Q.F16:
        return value.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return value.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(value.to(torch.float32).numpy(), qtype)


def _file_type(plan, gguf) -> int:
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    kinds = Counter(q for t, q, _ in plan if len(t.shape) > 1)
    main = kinds.most_common(1)[0][0] if kinds else Q.F32
    return {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0,
            Q.Q4_0: F.MOSTLY_Q4_0, Q.Q4_1: F.MOSTLY_Q4_1}[main]  # fmt: skip


def _metadata(job, plan, gguf) -> tuple[dict, dict]:
    """Config (family.config_to), general.* and tokenizer.* keys, with GGUF value types."""
    family = job.family
    if "gguf" not in family.config_to:
        raise SlimportError(f"--to gguf: writing {family.name} models to GGUF is not supported yet")
    meta = {"general.type": "model"}
    vtypes: dict[str, str] = {}
    src = job.source
    if src.format == "gguf":
        src_types = src.metadata.get("gguf_value_types", {})
        for key, value in src.metadata.items():
            if key.startswith("general.") and key not in _NOT_COPIED:
                meta[key], vtypes[key] = value, src_types.get(key)
    else:  # what the GGUF file it came from said, if it did (gguf_metadata.json)
        kept, kept_types = read_sidecar(Path(src.path).parent)
        for key, value in kept.items():
            if key.startswith("general.") and key not in _NOT_COPIED:
                meta[key], vtypes[key] = value, kept_types.get(key)
        name = name_from_hf(job.config) or Path(src.path).parent.name
        if name and "general.name" not in kept:
            meta["general.name"] = name
    meta.update(family.config_to["gguf"](job.cfg))
    meta["general.file_type"] = int(_file_type(plan, gguf))
    if any(
        q
        not in (
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.BF16,
        )
        for _, q, _ in plan
    ):
        meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    if src.format == "gguf":  # the tokenizer travels verbatim, with its own value types
        src_types = src.metadata.get("gguf_value_types", {})
        for key, value in src.metadata.items():
            if key.startswith("tokenizer."):
                meta[key], vtypes[key] = value, src_types.get(key)
    else:
        folders = {Path(f).parent for f in src.tokenizer_files if Path(f).name == "tokenizer.json"}
        if folders:
            tok, tok_types = gguf_tokenizer_from_hf(folders.pop(), int(job.cfg["vocab_size"]))
            meta.update(tok)
            vtypes.update({k: "ARRAY:" + v for k, v in tok_types.items()})
            if tok:  # the original's keys the tokenizer files cannot say (add_space_prefix, ...)
                for key, value in kept.items():
                    if key.startswith("tokenizer.") and key not in meta:
                        meta[key], vtypes[key] = value, kept_types.get(key)
    return meta, vtypes


def name_from_hf(cfg: dict) -> str | None:
    """A readable general.name from an HF config's _name_or_path (a hub id or a folder)."""
    name = cfg.get("_name_or_path") or ""
    name = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    return name or None


def _add_kv(writer, key: str, value, vtype: str | None, gguf) -> None:
    VT = gguf.GGUFValueType
    if vtype is None:
        vtype = _infer_type(value)
    if vtype.startswith("ARRAY"):
        values = list(value)
        if not values:
            return
        sub = vtype.partition(":")[2] or _infer_type(values[0])
        writer.add_key_value(key, values, VT.ARRAY, sub_type=VT[sub])
    else:
        writer.add_key_value(key, value, VT[vtype])


def _infer_type(value) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "UINT32" if 0 <= value < 2**32 else "INT64"
    if isinstance(value, float):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, Sequence):
        return "ARRAY"
    raise SlimportError(f"cannot store metadata value {value!r} in GGUF")
