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

from slimport.errors import SlimportError
from slimport.io.formats import GGUF_TYPES
from slimport.io.gguf import gguf_package
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
    if choice is not None and choice not in GGUF_TYPES:
        raise SlimportError(
            f"unknown --gguf-type {choice!r}", hint="one of: " + ", ".join(GGUF_TYPES)
        )
    plan = [(t, _tensor_type(t, choice, Q)) for t in tensors]
    meta, vtypes = _metadata(job, plan, gguf)
    arch = meta.pop("general.architecture", None)
    if not arch:
        raise SlimportError(
            f"--to gguf: {job.family.name} config_to['gguf'] gave no general.architecture"
        )
    writer = gguf.GGUFWriter(folder / "model.gguf", arch)
    for key, value in meta.items():
        _add_kv(writer, key, value, vtypes.get(key), gguf)
    for t, qtype in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(t.shape, dtype=np.int64)) // block * type_size
        writer.add_tensor_info(t.name, t.shape, np.float32, nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, qtype in plan:
            value = t.compute()
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                raise SlimportError(
                    f"tensor {t.name!r}: planned {list(t.shape)} {t.dtype}, got {list(value.shape)} {value.dtype}"
                )
            writer.write_tensor_data(_encode(value, qtype, Q, gguf))
            if progress:
                progress(value.numel() * value.element_size())
    finally:
        writer.close()
    return ["model.gguf"]


def _tensor_type(t, choice: str | None, Q):
    """llama.cpp's choice: 1-D tensors (norms, biases) F32; 2-D ones the requested type, by
    default the source precision (bf16 stays BF16: never silently fp16)."""
    if len(t.shape) == 1 or not t.dtype.is_floating_point:
        return Q.F32
    if choice is None:
        return {torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(t.dtype, Q.F32)
    if choice == "q8_0" and t.shape[-1] % 32:
        return Q.F16  # rows not a whole number of Q8_0 blocks: llama.cpp falls back to F16 too
    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[choice]


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
    kinds = Counter(q for t, q in plan if len(t.shape) > 1)
    main = kinds.most_common(1)[0][0] if kinds else Q.F32
    return {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0}[
        main
    ]


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
    else:
        name = name_from_hf(job.config) or Path(src.path).parent.name
        if name:
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
        for _, q in plan
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
