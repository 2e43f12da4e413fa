"""GGUF (llama.cpp): lazy memory-mapped reader (the writer is slimport.io.gguf_writer).

Layout: magic "GGUF", version, tensor count, KV count, the KV metadata, the tensor infos (name,
dims fastest-moving first, ggml type, offset), then the aligned tensor data. We parse the header
ourselves with `struct` over an mmap: gguf-py's `GGUFReader` builds a numpy view per element of
every metadata array, which costs ~2 s on a 49k-token vocabulary before a single weight is read.
Large arrays (vocabulary, merges, scores) stay undecoded until asked for (`GGUFArray`).
Tensor data is read and dequantized one tensor at a time with gguf-py's `gguf.quants`.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from slimport.errors import SlimportError
from slimport.io.base import Checkpoint, TensorInfo, element_count
from slimport.io.formats import FORMATS
from slimport.io.gguf_sidecar import write_sidecar
from slimport.io.gguf_tokenizer import has_tokenizer, write_hf_tokenizer

EAGER_ARRAY = 256  # metadata arrays up to this long are decoded into lists up front
MAX_DIMS = 4  # GGML_MAX_DIMS


def gguf_package():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a declared dependency
        raise SlimportError(
            "reading or writing GGUF needs the `gguf` package", hint="pip install gguf"
        ) from None
    return gguf


class GGUFArray(Sequence):
    """A large GGUF metadata array (vocabulary, merges, token types), decoded on first use."""

    def __init__(self, blob: bytes, vtype: str, count: int):
        self.blob, self.vtype, self.count = blob, vtype, count
        self._values: list | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return self.values()[i]

    def __iter__(self):
        return iter(self.values())

    def values(self) -> list:
        if self._values is None:
            self._values = _decode_array(self.blob, self.vtype, self.count)
        return self._values

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return f"<GGUF array of {self.count} {self.vtype}>"


_FMT = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
        "FLOAT32": "f", "UINT64": "Q", "INT64": "q", "FLOAT64": "d", "BOOL": "?"}  # fmt: skip


def _decode_array(blob: bytes, vtype: str, count: int) -> list:
    if vtype != "STRING":
        return list(struct.unpack(f"<{count}{_FMT[vtype]}", blob))
    out, pos, unpack = [], 0, struct.unpack_from
    for _ in range(count):
        (n,) = unpack("<Q", blob, pos)
        out.append(blob[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
        pos += 8 + n
    return out


class _Truncated(Exception):
    pass


class _Header:
    """Cursor over the mapped file; every read is bounds-checked (a short file is a clear error)."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.size = buf, path, len(buf)

    def unpack(self, fmt: str, pos: int) -> tuple[tuple, int]:
        end = pos + struct.calcsize(fmt)
        if end > self.size:
            raise _Truncated
        return struct.unpack_from(fmt, self.buf, pos), end

    def string(self, pos: int) -> tuple[str, int]:
        (n,), pos = self.unpack("<Q", pos)
        if pos + n > self.size:
            raise _Truncated
        try:
            return self.buf[pos : pos + n].decode("utf-8"), pos + n
        except UnicodeDecodeError:
            raise SlimportError(
                f"{self.path}: corrupt GGUF header (a key or name is not UTF-8 at byte {pos})"
            ) from None

    def value(self, vtype: str, pos: int, key: str) -> tuple[object, int, str]:
        """(value, position after it, type name; arrays as 'ARRAY:<element type>')."""
        if vtype in _FMT:
            (v,), pos = self.unpack("<" + _FMT[vtype], pos)
            if (
                vtype == "FLOAT32"
            ):  # shortest decimal that is the same float32: 1e-05, not 9.99999974e-06
                v = float(str(np.float32(v)))
            return v, pos, vtype
        if vtype == "STRING":
            return (*self.string(pos), vtype)
        if vtype != "ARRAY":
            raise SlimportError(
                f"{self.path}: corrupt GGUF metadata: key {key!r} has unknown value type {vtype}"
            )
        (sub, count), pos = self.unpack("<IQ", pos)
        sub = _value_type(sub, self.path, key)
        if sub == "ARRAY":
            raise SlimportError(
                f"{self.path}: GGUF key {key!r} holds nested arrays, which slimport does not read"
            )
        start = pos
        if sub == "STRING":
            if count > (self.size - pos) // 8:
                raise _Truncated
            unpack = struct.unpack_from
            for _ in range(count):
                if pos + 8 > self.size:
                    raise _Truncated
                pos += 8 + unpack("<Q", self.buf, pos)[0]
        else:
            pos += count * struct.calcsize(_FMT[sub])
        if pos > self.size:
            raise _Truncated
        blob = self.buf[start:pos]
        value = (
            _decode_array(blob, sub, count) if count <= EAGER_ARRAY else GGUFArray(blob, sub, count)
        )
        return value, pos, "ARRAY:" + sub


def _value_type(code: int, path: Path, key: str) -> str:
    try:
        return gguf_package().GGUFValueType(code).name
    except ValueError:
        raise SlimportError(
            f"{path}: corrupt GGUF metadata: key {key!r} has unknown value type id {code}"
        ) from None


# ggml types held as plain values, and the torch dtype they load as (everything else dequantizes to float32)
_NATIVE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}  # fmt: skip


@functools.cache
def _can_dequantize(qtype) -> bool:
    gguf = gguf_package()
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


DEQUANT_CHUNK = 1 << 22  # values per dequantization call: bounds the temporaries


def _dequantize(data: np.ndarray, qtype, row: int) -> np.ndarray:
    """gguf-py's dequantizer for `qtype` over [rows, row] values, in chunks of ~4M values.

    `gguf.quants.dequantize` works 16 rows at a time, which costs ~40% more Python overhead on
    small models; we call the same per-type `dequantize_rows` on bigger chunks (results are
    identical, see tests) and fall back to the public function if gguf-py changes shape.
    """
    gguf = gguf_package()
    cls = getattr(gguf.quants, qtype.name, None)
    rows_fn = getattr(cls, "dequantize_rows", None)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    packed = data.reshape(-1, row // block * type_size)
    if rows_fn is None or getattr(cls, "qtype", None) != qtype:
        return gguf.quants.dequantize(packed, qtype)
    if hasattr(cls, "init_grid"):  # lookup tables of the IQ types
        cls.init_grid()
    step = max(1, DEQUANT_CHUNK // row)
    if packed.shape[0] <= step:
        return rows_fn(packed)
    out = np.empty((packed.shape[0], row), dtype=np.float32)
    for i in range(0, packed.shape[0], step):
        out[i : i + step] = rows_fn(packed[i : i + step])
    return out


def _parse(path: Path, buf) -> tuple[dict, dict, dict]:
    """(metadata, value types, {name: (qtype, torch shape, start byte, nbytes)})."""
    gguf = gguf_package()
    h = _Header(buf, path)
    if buf[:4] != b"GGUF":
        raise SlimportError(
            f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')",
            hint="the file is corrupt, or pass --from with its real format",
        )
    (version,), pos = h.unpack("<I", 4)
    if version & 0xFFFF == 0:
        raise SlimportError(
            f"{path}: big-endian GGUF files are not supported",
            hint="convert it with gguf_convert_endian",
        )
    if version not in (2, 3):
        raise SlimportError(
            f"{path}: GGUF version {version} is not supported (slimport reads versions 2 and 3)"
        )
    (n_tensors, n_kv), pos = h.unpack("<QQ", pos)
    # each key takes >= 13 bytes and each tensor info >= 28: more than fit means a cut-off file
    if n_kv > h.size // 13 or n_tensors > h.size // 28:
        raise SlimportError(
            f"{path}: truncated or corrupt GGUF header (claims {n_tensors} tensors and {n_kv} keys "
            f"in a file of {h.size} bytes)",
            hint="the download or copy was cut short, or the file is damaged; fetch it again",
        )
    meta: dict = {"gguf_version": version}
    vtypes: dict[str, str] = {}
    for _ in range(n_kv):
        key, pos = h.string(pos)
        (code,), pos = h.unpack("<I", pos)
        vtype = _value_type(code, path, key)
        meta[key], pos, vtypes[key] = h.value(vtype, pos, key)
    raw = []
    for _ in range(n_tensors):
        name, pos = h.string(pos)
        (n_dims,), pos = h.unpack("<I", pos)
        if not 1 <= n_dims <= MAX_DIMS:
            raise SlimportError(
                f"{path}: corrupt GGUF tensor info: {name!r} has {n_dims} dimensions"
            )
        dims, pos = h.unpack(f"<{n_dims}Q", pos)
        (code, offset), pos = h.unpack("<IQ", pos)
        raw.append((name, dims, code, offset))
    alignment = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise SlimportError(
            f"{path}: corrupt GGUF header (general.alignment={alignment!r} is not a power of two)"
        )
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, dims, code, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(code)
        except ValueError:
            raise SlimportError(
                f"{path}: tensor {name!r} has ggml type id {code}, unknown to gguf {_version()}",
                hint="the file needs a newer llama.cpp/gguf; upgrade the gguf package",
            ) from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise SlimportError(
                f"{path}: corrupt GGUF tensor info: {name!r} row of {dims[0]} is not a multiple of the {qtype.name} block ({block})"
            )
        nbytes = element_count(dims, f"{path}: tensor {name!r}") // block * type_size
        if name in tensors:
            raise SlimportError(f"{path}: corrupt GGUF file: tensor {name!r} appears twice")
        if offset % alignment:
            raise SlimportError(
                f"{path}: corrupt GGUF tensor info: {name!r} data offset {offset} is not {alignment}-byte aligned"
            )
        start = data_start + offset
        if start + nbytes > h.size:
            raise SlimportError(
                f"{path}: truncated GGUF file: tensor {name!r} ends at byte {start + nbytes} but the file has {h.size} bytes",
                hint="the download or copy was cut short; fetch the file again",
            )
        tensors[name] = (qtype, tuple(int(d) for d in reversed(dims)), start, nbytes)
    bad = sorted(
        {q.name for q, *_ in tensors.values() if q.name not in _NATIVE and not _can_dequantize(q)}
    )
    if bad:
        which = [n for n, (q, *_) in tensors.items() if q.name in bad]
        raise SlimportError(
            f"{path}: tensor {which[0]!r}"
            + (f" and {len(which) - 1} more" if len(which) > 1 else "")
            + f" use ggml type {', '.join(bad)}, which gguf {_version()} cannot dequantize",
            hint="re-quantize the model to a supported type (e.g. Q8_0, Q4_K, F16) with llama-quantize",
        )
    meta["gguf_types"] = dict(Counter(q.name for q, *_ in tensors.values()))
    by_type: Counter = Counter()
    for qtype, _, _, nbytes in tensors.values():
        by_type[qtype.name] += nbytes
    meta["gguf_type_bytes"] = dict(by_type)  # what the file stores, per ggml type
    return meta, vtypes, tensors


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - only for messages
        return "(unknown version)"


def read(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # mmap of an empty file
        raise SlimportError(f"{path}: empty file, not a GGUF checkpoint") from None
    except OSError as e:
        raise SlimportError(f"{path}: cannot open ({e.strerror})") from None
    try:
        meta, vtypes, tensors = _parse(path, buf)
    except _Truncated:
        buf.close()
        raise SlimportError(
            f"{path}: truncated or corrupt GGUF header (the metadata runs past the end of the file)",
            hint="the download or copy was cut short; fetch the file again",
        ) from None
    except BaseException:
        buf.close()
        raise
    meta["gguf_value_types"] = vtypes
    infos = {
        n: TensorInfo(shape, _NATIVE.get(q.name, torch.float32))
        for n, (q, shape, _, _) in tensors.items()
    }

    def load(name: str) -> torch.Tensor:
        qtype, shape, start, nbytes = tensors[name]
        data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
        if qtype.name in _NATIVE:  # copy the raw values (bf16 and f16 keep their dtype)
            out = torch.empty(shape, dtype=_NATIVE[qtype.name])
            if nbytes:
                out.reshape(-1).view(torch.uint8).numpy()[:] = data
            return out
        return torch.from_numpy(_dequantize(data, qtype, shape[-1]).reshape(shape))

    def close() -> None:
        with contextlib.suppress(BufferError):  # a tensor view is still alive; the map goes with it
            buf.close()

    def writer(folder: Path) -> list[str]:
        """The HF tokenizer files it embeds, and its general.*/tokenizer.* metadata beside them."""
        tok = write_hf_tokenizer(meta, folder, where=str(path)) if has_tokenizer(meta) else []
        return [*tok, *write_sidecar(meta, folder)]

    ckpt = Checkpoint(
        path,
        "gguf",
        infos,
        load,
        FORMATS["gguf"].dialects,
        config=None,
        metadata=meta,
        closer=close,
    )
    ckpt.tokenizer_writer = writer
    return ckpt
