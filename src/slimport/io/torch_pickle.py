"""PyTorch pickles (.bin/.pt/.pth): zip and legacy files, and sharded pytorch_model.bin.index.json.

Always `torch.load(weights_only=True)`: a pickle that would build anything but tensors and plain
containers (an `os.system` call, a custom class) is refused before any of it runs. Zip files are
memory-mapped (`mmap=True`), so opening one reads only its pickled index; each tensor's bytes are
paged in when `load()` copies it out, and dropped from the process again right after (see
`_release`), so reading a whole file does not leave it all resident. Legacy (pre-1.6, non-zip)
pickles cannot be mapped and are held in memory once.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from slimport.errors import SlimportError, name_list
from slimport.io.base import (
    Checkpoint,
    TensorInfo,
    check_shard,
    read_shard_index,
    release_freed_memory,
)
from slimport.io.formats import FORMATS

# Keys that training scripts wrap a model's state dict in; their siblings (optimizer, epoch) are skipped.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def read(path: Path) -> Checkpoint:
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    tensors, skipped, kind = _load_file(path)
    infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    mapped = set(tensors) if kind == "zip" else set()
    return Checkpoint(
        path, "pytorch", infos, _loader(tensors, mapped), FORMATS["pytorch"].dialects, metadata={"pickle": kind}, skipped=skipped,
        closer=tensors.clear,
    )  # fmt: skip


def _loader(tensors: dict[str, torch.Tensor], mapped: set[str]):
    def load(name: str) -> torch.Tensor:
        release_freed_memory()  # tensors the caller dropped since the last load
        t = tensors[name]
        # a copy the caller owns: it may keep or modify it, the mapped file stays untouched
        out = t.clone()
        if name in mapped:
            _release(t)
        return out

    return load


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """{name: tensor} (memory-mapped for zip files), skipped entry names, and "zip" or "legacy"."""
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    if is_zip:
        _check_records(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise _refused(path, str(e)) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        what = "zip" if is_zip else "legacy pickle"
        raise SlimportError(
            f"{path}: corrupt or truncated PyTorch checkpoint ({what}; torch.load: {_first_line(e)})",
            hint="the file is damaged or not a PyTorch checkpoint; fetch it again",
        ) from None
    tensors, skipped = _state_dict(obj, path)
    if not tensors:
        raise SlimportError(
            f"{path}: holds no tensors" + (f" (only {name_list(skipped)})" if skipped else "")
        )
    return tensors, skipped, "zip" if is_zip else "legacy"


def _refused(path: Path, message: str) -> SlimportError:
    """weights_only refusals: name the offending global when torch tells us one."""
    reason = message
    for marker in ("trusted source.", "WeightsUnpickler error:"):  # drop torch's generic preamble
        reason = reason.split(marker, 1)[-1]
    reason = " ".join(reason.split("Check the documentation")[0].split())[:300]
    if re.search(r"global", reason, re.IGNORECASE):
        return SlimportError(
            f"{path}: the pickle contains code (objects other than tensors); weights_only loading refused it "
            f"and nothing was executed ({reason})",
            hint="only load pickles you trust; convert a trusted one to safetensors with a script that uses "
            "torch.load(weights_only=False) on a machine where running its code is acceptable",
        )
    return SlimportError(
        f"{path}: weights_only loading refused this pickle: it is corrupt or contains code ({reason})",
        hint="the file is damaged or not a plain PyTorch state dict",
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def _state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Unwrap {"state_dict": ...} style wrappers and flatten nested dicts; non-tensors are skipped."""
    if not isinstance(obj, Mapping):
        raise SlimportError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)"
        )
    skipped: list[str] = []
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                skipped = [str(k) for k in obj if k != key]
                obj = obj[key]
                break
    tensors: dict[str, torch.Tensor] = {}

    def walk(d: Mapping, prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                tensors[name] = _checked(v, name, path)
            elif isinstance(v, Mapping):
                walk(v, name + ".")
            else:
                skipped.append(name)

    walk(obj, "")
    return tensors, skipped


class _Inert(dict):
    """Stands for every class a pickle names while `_StorageSizes` walks it: builds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _StorageSizes(pickle.Unpickler):
    """Collects each storage's declared (type name, element count) from a zip's data.pkl;
    imports and calls nothing (every global is `_Inert`)."""

    def __init__(self, file):
        super().__init__(file)
        self.declared: dict[str, tuple[str, int]] = {}

    def find_class(self, module, name):
        return type(name, (_Inert,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            self.declared[str(pid[2])] = (getattr(pid[1], "__name__", ""), pid[4])
        return _Inert()


_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1,
}  # fmt: skip


def _check_records(path: Path) -> None:
    """Each storage's declared size must match its record in the zip: memory-mapped loading
    (unlike a plain read) does not check, and a larger claim reads the zip's other bytes as data."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n.endswith("data.pkl")), None)
            if pkl is None or infos[pkl].file_size > 1 << 30:
                return
            walker = _StorageSizes(io.BytesIO(z.read(pkl)))
            walker.load()
    except Exception:  # noqa: BLE001 - a damaged file: torch.load below names the problem
        return
    prefix = pkl[: -len("data.pkl")]
    for key, (kind, numel) in walker.declared.items():
        record = infos.get(f"{prefix}data/{key}")
        itemsize = _STORAGE_ITEMSIZE.get(kind)
        if record is None or itemsize is None or not isinstance(numel, int):
            continue  # torch.load reports a missing record itself
        if record.file_size != numel * itemsize:
            raise SlimportError(
                f"{path}: storage {key} declares {numel} elements ({numel * itemsize} bytes) but "
                f"its record holds {record.file_size} bytes",
                hint="the file is damaged or crafted; fetch it again",
            )


def _checked(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """A tensor may not declare more elements than its storage holds: a stride-0 or overlapping
    view of a tiny storage would expand to any size when load() copies it out."""
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if need > have:
        raise SlimportError(
            f"{path}: tensor {name!r} declares shape {list(t.shape)} ({need} bytes) over a "
            f"storage of {max(have, 0)} bytes (a strided or truncated view); refused",
            hint="the file is damaged or crafted; save the state dict with contiguous tensors",
        )
    return t


def _read_sharded(index: Path) -> Checkpoint:
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    mapped: set[str] = set()
    for spath, listed in read_shard_index(index).items():
        part, skip, kind = _load_file(spath)
        check_shard(index, spath, listed, part)
        tensors.update(part)
        skipped += skip
        if kind == "zip":
            mapped.update(part)
    infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    return Checkpoint(
        index,
        "pytorch",
        infos,
        _loader(tensors, mapped),
        FORMATS["pytorch"].dialects,
        skipped=skipped,
        closer=tensors.clear,
    )


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = (
    4  # Linux value; pages of a private file mapping we never wrote refault from the file
)
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # not Linux/glibc: pages simply stay resident until close
    _madvise = None


def _release(t: torch.Tensor) -> None:
    """Drop the pages a memory-mapped tensor occupied, so RSS stays ~ one tensor, not the file.

    Only for storage torch.load(mmap=True) mapped from a zip file (MAP_PRIVATE, never written):
    the kernel re-reads those pages from the file if they are touched again. Never call it on
    heap tensors (legacy pickles): their contents would be lost.
    """
    if _madvise is None or t.numel() == 0:
        return
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    # whole pages inside the storage only: neighbouring tensors may share the partial ones
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)
