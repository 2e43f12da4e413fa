"""MindSpore .ckpt: lazy reader and streaming writer of MindSpore's protobuf checkpoint format.

The file is MindSpore's `checkpoint.proto` (mindspore/train/checkpoint_pb2.py):

    message Checkpoint { repeated Value value = 1;
      message Value { required string tag = 1;
                      oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

`mindspore.save_checkpoint` does not write one big message: it serialises one `Checkpoint`
holding a single `Value` per tensor *slice* (at most 512 MiB of data) and appends them to the file
(protobuf merges concatenated messages; repeated fields append). `load_checkpoint` reads the
whole file, parses it and joins consecutive slices with the same tag: loading a 496 MB file
peaked at +993 MB RSS (and importing mindspore costs ~360 MB more).

Here both directions use that wire format directly, without importing mindspore:
* reading walks the field headers and records where each tensor's bytes lie, then `load()`
  reads one tensor with positioned reads: opening costs no tensor data, a load one tensor;
* writing emits exactly the bytes `save_checkpoint` emits for the same tensors (the tests check
  byte equality against mindspore.save_checkpoint and load the result back with
  mindspore.load_checkpoint), streaming tensor by tensor; each slice's few header bytes are
  encoded here and its data written straight from the tensor's memory, so peak memory is the
  largest tensor, where save_checkpoint needs every tensor in memory at once.
Optional trailers: MindSpore's `crc_check=True` appends b"crc_num" + 10 bytes (verified when
present). Encrypted checkpoints (enc_key) cannot be read without MindSpore and the key.
"""

from __future__ import annotations

import binascii
import os
from pathlib import Path

import torch

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, atomic_path, release_freed_memory
from slimport.io.formats import FORMATS
from slimport.io.hf import copy_tokenizer, write_config

# MindSpore tensor_type strings (str(mindspore dtype)) <-> torch
DTYPES = {
    "Float32": torch.float32,
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float64": torch.float64,
    "Int8": torch.int8,
    "UInt8": torch.uint8,
    "Int16": torch.int16,
    "UInt16": torch.uint16,
    "Int32": torch.int32,
    "UInt32": torch.uint32,
    "Int64": torch.int64,
    "UInt64": torch.uint64,
    "Bool": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
# save_checkpoint cuts a tensor's bytes into 512 MiB slices (serialization.SLICE_SIZE KB): same here,
# so the files are byte-identical; data goes straight from the tensor, the size costs no memory.
SLICE_BYTES = 512 * 1024 * 1024

# Training state MindSpore/MindFormers checkpoints carry besides weights (optimizer moments, step
# counters, loss scale): not model tensors, reported in `skipped`.
TRAINING_STATE = frozenset(
    ("global_step", "learning_rate", "beta1_power", "beta2_power", "epoch_num", "step_num", "loss_scale",
     "scale_sense", "current_iterator_step", "last_overflow_iterator_step", "momentum")
)  # fmt: skip
TRAINING_PREFIXES = (
    "moment1.",
    "moment2.",
    "adam_m.",
    "adam_v.",
    "accu_grads.",
    "accumulation.",
    "moments.",
)
_CRC = b"crc_num"


class _Corrupt(Exception):
    pass


def read(path: Path) -> Checkpoint:
    size = path.stat().st_size
    if size == 0:
        raise SlimportError(f"{path}: empty file, not a MindSpore checkpoint")
    end = size
    with open(path, "rb") as f:
        if size >= 17:
            f.seek(size - 17)
            tail = f.read(17)
            if tail[:7] == _CRC:
                end = size - 17
                _check_crc(f, path, end, int.from_bytes(tail[7:], "big"))
        f.seek(0)
        try:
            entries = _index(f, end)
        except _Corrupt as e:
            raise SlimportError(
                f"{path}: corrupt or truncated MindSpore checkpoint ({e})",
                hint="the file is damaged, encrypted, or not a MindSpore .ckpt; fetch or save it again",
            ) from None
    if not entries:
        raise SlimportError(f"{path}: MindSpore checkpoint holds no tensors")
    infos, spans, skipped, metadata = {}, {}, [], {}
    for tag, (dims, ttype, segments) in entries.items():
        if ttype == "str":  # append_dict strings (e.g. a model name): metadata, not tensors
            metadata[tag] = (
                _read_segments(path, segments).decode("utf-32-le", "replace").rstrip("\0")
            )
            skipped.append(tag)
            continue
        if ttype not in DTYPES:
            raise SlimportError(
                f"{path}: tensor {tag!r} has MindSpore type {ttype!r}, which slimport cannot read",
                hint="supported: " + ", ".join(DTYPES),
            )
        dtype, shape = DTYPES[ttype], tuple(dims)
        count = 1
        for d in shape:
            count *= d
        nbytes = sum(n for _, n in segments)
        if nbytes != count * dtype.itemsize:
            raise SlimportError(
                f"{path}: tensor {tag!r} holds {nbytes} bytes, but shape {list(shape)} {ttype} needs "
                f"{count * dtype.itemsize}",
                hint="the checkpoint is corrupt",
            )
        if tag in TRAINING_STATE or tag.startswith(TRAINING_PREFIXES):
            skipped.append(tag)
            continue
        infos[tag] = TensorInfo(shape, dtype)
        spans[tag] = segments

    def load(name: str) -> torch.Tensor:
        release_freed_memory()  # tensors the caller dropped since the last load
        info = infos[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if out.numel():
            buf = out.reshape(-1).view(torch.uint8).numpy()
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = 0
                for offset, n in spans[name]:
                    if os.preadv(fd, [buf[pos : pos + n]], offset) != n:
                        raise SlimportError(
                            f"{path}: could not read tensor {name!r} (file changed or truncated)"
                        )
                    pos += n
            finally:
                os.close(fd)
        return out

    return Checkpoint(
        path,
        "mindspore",
        infos,
        load,
        FORMATS["mindspore"].dialects,
        metadata=metadata,
        skipped=skipped,
    )


def _index(f, end: int) -> dict[str, tuple[list[int], str, list[tuple[int, int]]]]:
    """tag -> (dims, tensor_type, [(offset, length) of each slice's bytes]) from field headers only."""
    entries: dict[str, tuple[list[int], str, list[tuple[int, int]]]] = {}
    last = None
    for field, wire, value in _fields(f, end):
        if field != 1 or wire != 2:
            raise _Corrupt(f"unexpected protobuf field {field} (wire type {wire}) at top level")
        start, n = value
        tag, dims, ttype, content = _value(f, start + n)
        if tag is None or ttype is None or content is None:
            raise _Corrupt(f"checkpoint entry at byte {start} lacks its tag, type or data")
        if tag == last:  # a tensor larger than one slice: consecutive entries, same tag
            if entries[tag][0] != dims or entries[tag][1] != ttype:
                raise _Corrupt(f"slices of tensor {tag!r} disagree on shape or type")
            entries[tag][2].append(content)
        elif tag in entries:
            raise _Corrupt(f"tensor {tag!r} appears twice")
        else:
            entries[tag] = (dims, ttype, [content])
        last = tag
    return entries


def _value(f, end: int):
    tag = ttype = content = None
    dims: list[int] = []
    for field, wire, value in _fields(f, end):
        if field == 1 and wire == 2:
            tag = _string(f, value)
        elif field == 2 and wire == 2:
            for tfield, twire, tvalue in _fields(f, value[0] + value[1]):
                if tfield == 1 and twire == 0:
                    dims.append(tvalue)
                elif (
                    tfield == 1 and twire == 2
                ):  # packed dims (valid protobuf, not what MindSpore writes)
                    sub_end = tvalue[0] + tvalue[1]
                    while f.tell() < sub_end:
                        dims.append(_varint(f))
                elif tfield == 2 and twire == 2:
                    ttype = _string(f, tvalue)
                elif tfield == 3 and twire == 2:
                    content = tvalue
        elif field == 3 and wire == 2:
            raise _Corrupt("MapParameter entries (maptensor) are not supported")
    return tag, dims, ttype, content


def _fields(f, end: int):
    """Yield (field number, wire type, varint value or (offset, length)); skips over payloads."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Corrupt(f"invalid protobuf key at byte {f.tell()}")
        if wire == 0:
            yield field, wire, _varint(f)
        elif wire == 2:
            n = _varint(f)
            start = f.tell()
            if start + n > end:
                raise _Corrupt(
                    f"a field at byte {start} needs {n} bytes, but only {end - start} remain (truncated)"
                )
            yield field, wire, (start, n)
            f.seek(start + n)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise _Corrupt(f"invalid protobuf wire type {wire} at byte {f.tell()}")
    if f.tell() != end:
        raise _Corrupt("a field runs past the end of its message")


def _varint(f) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise _Corrupt("unexpected end of file (truncated)")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _Corrupt(f"invalid varint at byte {f.tell()}")


def _string(f, span: tuple[int, int]) -> str:
    f.seek(span[0])
    try:
        return f.read(span[1]).decode()
    except UnicodeDecodeError:
        raise _Corrupt(f"invalid UTF-8 string at byte {span[0]}") from None


def _read_segments(path: Path, segments: list[tuple[int, int]]) -> bytes:
    with open(path, "rb") as f:
        parts = []
        for offset, n in segments:
            f.seek(offset)
            parts.append(f.read(n))
    return b"".join(parts)


def _check_crc(f, path: Path, end: int, expected: int) -> None:
    crc, pos = 0, 0
    f.seek(0)
    while pos < end:
        chunk = f.read(min(1 << 24, end - pos))
        crc = binascii.crc32(chunk, crc)
        pos += len(chunk)
    if crc != expected:
        raise SlimportError(
            f"{path}: CRC check failed: the MindSpore checkpoint is corrupt",
            hint="fetch or save it again",
        )


# ---------------------------------------------------------------------------------------- writing


def write_model(folder: Path, tensors: list, job, progress=None) -> list[str]:
    """model.ckpt + config.json (+ tokenizer files) into `folder` (a temp folder the caller renames)."""
    write(folder / "model.ckpt", tensors, progress)
    write_config(folder, job)
    return ["model.ckpt", "config.json", *copy_tokenizer(folder, job.source)]


def write(path: Path, tensors, progress=None) -> None:
    """Stream planned tensors (.name .shape .dtype .compute()) into a MindSpore .ckpt, atomically."""
    tensors = list(tensors)
    for t in tensors:
        if t.dtype not in CODES:
            raise SlimportError(
                f"tensor {t.name!r}: dtype {t.dtype} cannot be stored in a MindSpore checkpoint",
                hint="pass --dtype float32, float16 or bfloat16",
            )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for t in tensors:
            value = t.compute()
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                raise SlimportError(
                    f"tensor {t.name!r}: planned {list(t.shape)} {t.dtype}, got {list(value.shape)} {value.dtype}"
                )
            data = memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy())
            for i in range(0, max(len(data), 1), SLICE_BYTES):
                piece = data[i : i + SLICE_BYTES]
                f.write(_slice_header(t.name, t.shape, CODES[t.dtype], len(piece)))
                f.write(piece)
            nbytes = len(data)
            del value, data, piece
            release_freed_memory()
            if progress:
                progress(nbytes)


def _slice_header(tag: str, shape, ttype: str, nbytes: int) -> bytes:
    """Serialized Checkpoint{value: [Value{tag, tensor{dims, tensor_type, tensor_content}}]} up to
    the content bytes, fields in field-number order exactly as protobuf's SerializeToString."""
    dims = b"".join(b"\x08" + _encode_varint(d) for d in shape)  # proto2 repeated int64: not packed
    ttype_b = ttype.encode()
    tensor_len = len(dims) + 1 + _vlen(len(ttype_b)) + len(ttype_b) + 1 + _vlen(nbytes) + nbytes
    tag_b = tag.encode()
    value_len = 1 + _vlen(len(tag_b)) + len(tag_b) + 1 + _vlen(tensor_len) + tensor_len
    return b"".join((
        b"\x0a", _encode_varint(value_len),
        b"\x0a", _encode_varint(len(tag_b)), tag_b,
        b"\x12", _encode_varint(tensor_len),
        dims,
        b"\x12", _encode_varint(len(ttype_b)), ttype_b,
        b"\x1a", _encode_varint(nbytes),
    ))  # fmt: skip


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _vlen(n: int) -> int:
    return len(_encode_varint(n))
