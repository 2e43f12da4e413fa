"""safetensors, single file or sharded (model.safetensors.index.json): lazy read, streaming write.

The format is an 8-byte little-endian header length, a JSON header of name -> dtype, shape and
byte offsets, then raw little-endian data. We parse the header ourselves and read each tensor
with one positioned read: no whole-file mmap, so peak memory is one tensor, not the shard.
Writing streams tensor by tensor into a temp file whose header is computed from planned shapes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path

import torch

from slimport.errors import SlimportError
from slimport.io.base import (
    Checkpoint,
    TensorInfo,
    atomic_path,
    check_shard,
    element_count,
    parse_json,
    read_shard_index,
    regular_file,
)
from slimport.io.formats import FORMATS

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000


def _parse_header(path: Path) -> tuple[dict, dict, int]:
    """Return ({name: (dtype, shape, begin, end)}, metadata, data_start) after validating."""
    size = regular_file(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SlimportError(
                f"{path}: truncated safetensors file (shorter than its 8-byte header length)"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER):
            raise SlimportError(
                f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})",
                hint="the file is truncated or not safetensors; download it again",
            )
        header = parse_json(f.read(n), path, "corrupt safetensors header (invalid JSON)")
    if not isinstance(header, dict):
        raise SlimportError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise SlimportError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    start = 8 + n
    entries = {}
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, offsets = DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
            b, end = offsets
        except (KeyError, TypeError, ValueError):
            raise SlimportError(f"{where}: corrupt safetensors header entry") from None
        count = element_count(shape, where)
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (b, end)) or b < 0:
            raise SlimportError(f"{where}: data_offsets {offsets!r} are not two byte offsets")
        if end - b != count * dtype.itemsize:
            raise SlimportError(f"{where}: byte range does not match its shape {list(shape)}")
        if start + end > size:
            raise SlimportError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {start + end} "
                f"but the file has {size} bytes",
                hint="the download or copy was cut short; fetch the file again",
            )
        entries[name] = (dtype, tuple(shape), b, end)
    _check_disjoint(path, entries)
    return entries, meta, start


def _check_disjoint(path: Path, entries: dict) -> None:
    """Two tensors sharing bytes is a crafted file (the safetensors library refuses it too)."""
    spans = sorted((b, end, name) for name, (_, _, b, end) in entries.items() if end > b)
    for (_, end, first), (b, _, second) in pairwise(spans):
        if b < end:
            raise SlimportError(f"{path}: tensors {first!r} and {second!r} overlap in the file")


def _reader(path: Path, entries: dict, start: int) -> Callable[[str], torch.Tensor]:
    def load(name: str) -> torch.Tensor:
        dtype, shape, b, end = entries[name]
        out = torch.empty(shape, dtype=dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buf], start + b)
            finally:
                os.close(fd)
            if got != end - b:
                raise SlimportError(
                    f"{path}: could not read tensor {name!r} (file changed or truncated)"
                )
        return out

    return load


def read(path: Path) -> Checkpoint:
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    entries, meta, start = _parse_header(path)
    infos = {n: TensorInfo(shape, dtype) for n, (dtype, shape, _, _) in entries.items()}
    return Checkpoint(
        path,
        "safetensors",
        infos,
        _reader(path, entries, start),
        FORMATS["safetensors"].dialects,
        metadata=meta,
    )


def _read_sharded(index: Path) -> Checkpoint:
    infos, loaders = {}, {}
    for spath, listed in read_shard_index(index).items():
        entries, _, start = _parse_header(spath)
        check_shard(index, spath, listed, entries)
        load = _reader(spath, entries, start)
        for n, (dtype, shape, _, _) in entries.items():
            infos[n] = TensorInfo(shape, dtype)
            loaders[n] = load
    return Checkpoint(
        index, "safetensors", infos, lambda n: loaders[n](n), FORMATS["safetensors"].dialects
    )


def write(
    path: Path,
    tensors: Iterable,  # of objects with .name, .shape, .dtype, .compute()
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream planned tensors into one safetensors file, atomically."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in CODES:
            raise SlimportError(
                f"tensor {t.name!r}: dtype {t.dtype} cannot be stored in safetensors"
            )
        nbytes = t.dtype.itemsize
        for d in t.shape:
            nbytes *= d
        header[t.name] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes like the reference writer
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            value = t.compute()
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                raise SlimportError(
                    f"tensor {t.name!r}: planned {list(t.shape)} {t.dtype}, got {list(value.shape)} {value.dtype}"
                )
            if value.numel():
                flat = value.contiguous().reshape(-1)
                # a 1-element tensor keeps any stride (e.g. [1, 1] with (1, 4)), which view refuses
                flat = flat.as_strided(flat.shape, (1,))
                f.write(flat.view(torch.uint8).numpy().data)
            if progress:
                progress(value.numel() * value.element_size())


MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def shard_bytes(size: int | str) -> int:
    """transformers' `max_shard_size`: bytes, or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = str(size).strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
    try:
        n = float(text[: -len(unit)]) * _UNITS[unit] if unit else float(text)
    except ValueError:
        n = 0
    if not n >= 1:
        raise SlimportError(
            f"max_shard_size {size!r} is not a size", hint='bytes, or e.g. "5GB", "500MB", "2GiB"'
        )
    return int(n)


def write_sharded(
    folder: Path,
    tensors: list,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """HF layout as transformers' save_pretrained writes it: model.safetensors, or
    model-0000i-of-0000n.safetensors + index when larger than `max_shard_size` (a tensor
    opens a new shard when it would overflow the current one; a larger one gets a shard alone)."""
    limit = shard_bytes(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    total = 0
    for t in tensors:
        n = t.dtype.itemsize
        for d in t.shape:
            n *= d
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
        total += n
    if len(shards) == 1:
        write(folder / "model.safetensors", shards[0], progress=progress)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write(folder / name, shard, progress=progress)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {
            t.name: name for name, shard in zip(names, shards, strict=True) for t in shard
        },
    }
    with atomic_path(folder / "model.safetensors.index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


class _Stored:
    """A tensor of a part file, in the form writers take; the part is deleted once all of its
    tensors have been read, so resharding needs about one part of extra disk, not the model."""

    def __init__(self, name: str, dtype, shape, load, left: list, path: Path) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape
        self._load, self._left, self._path = load, left, path

    def compute(self) -> torch.Tensor:
        value = self._load(self.name)
        self._left[0] -= 1
        if not self._left[0]:
            self._path.unlink()
        return value


def reshard(
    parts: list[Path], folder: Path, max_shard_size: int | str = MAX_SHARD_SIZE
) -> list[str]:
    """Join safetensors part files (written one block at a time) into `folder` in HF's sharded
    layout, tensor by tensor in the parts' order; each part is removed once it has been read."""
    tensors = []
    for path in parts:
        entries, _, start = _parse_header(path)
        load, left = _reader(path, entries, start), [len(entries)]
        order = sorted(entries.items(), key=lambda e: e[1][2])  # as stored
        tensors += [_Stored(n, e[0], e[1], load, left, path) for n, e in order]
        if not entries:
            path.unlink()
    return write_sharded(folder, tensors, max_shard_size)
