"""The reader interface every checkpoint format implements, and atomic output files."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimport.errors import SlimportError, name_list


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A lazily readable set of named tensors plus what the file says about the model.

    `infos` is known up front (from headers); `load(name)` reads one tensor when asked.
    `config` is a Hugging Face style config dict when the format carries one (config.json
    beside the weights, GGUF metadata, a llama2.c header), else None.
    `dialects` lists the naming dialects this format can hold, most likely first.
    """

    path: Path
    format: str
    infos: dict[str, TensorInfo]
    loader: Callable[[str], torch.Tensor]
    dialects: tuple[str, ...]
    config: dict | None = None
    metadata: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # e.g. optimizer slots the reader ignored
    tokenizer_files: list[Path] = field(default_factory=list)
    # formats that embed a tokenizer (GGUF) write HF tokenizer files into a folder
    tokenizer_writer: Callable[[Path], list[str]] | None = None
    closer: Callable[[], None] | None = None
    # integer-held Linears (io.compressed.IntLinear) by module name: a runtime computing with
    # integers reads these instead of the dequantized `weight` tensors
    quantized: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str) -> torch.Tensor:
        return self.loader(name)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_parameters(self) -> int:
        n = 0
        for info in self.infos.values():
            k = 1
            for d in info.shape:
                k *= d
            n += k
        return n


try:
    _libc = ctypes.CDLL(None)
    _malloc_trim, _mallopt = _libc.malloc_trim, _libc.mallopt  # glibc
except (OSError, AttributeError):
    _malloc_trim = _mallopt = None
_M_MMAP_THRESHOLD = -3


@dataclass
class Ready:
    """A tensor already in memory, in the form writers take (name, shape, dtype, compute())."""

    name: str
    value: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def compute(self) -> torch.Tensor:
        return self.value


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS; streaming writers call it after each tensor.

    glibc serves 64-byte-aligned tensor buffers of up to 32 MB from the heap once its dynamic
    mmap threshold has grown, and interleaved small allocations (h5py, protobuf) leave the freed
    buffers as holes that stay resident: writing 500 MB of 16 MB tensors to h5 peaked at +404 MB
    RSS without this, +68 MB with it.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


@contextlib.contextmanager
def bounded_heap(threshold: int = 16 << 20):
    """Serve every allocation of `threshold` bytes or more from its own mapping, returned to the
    OS the moment it is freed. glibc otherwise raises its mmap threshold to 32 MB as large
    buffers come and go, and heap holes left by freed activations and Hessians stay resident:
    GPTQ of a 3.3 GB Llama peaked at 1474 MB RSS that way, 1110 MB with 16 MB here (1 MB: 1117
    MB, but 15% slower on SmolLM2, whose activations are then all fresh mappings; 16 MB: 4%).
    Process-wide while active; afterwards the threshold stays fixed at glibc's initial 128 KB."""
    if _mallopt is None:
        yield
        return
    _mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


MAX_ELEMENTS = 1 << 40  # no real tensor comes close; products above this are lies or wraps


def confined(folder: Path, name: str, where: Path | None = None) -> Path:
    """`folder / name` after resolving links, refused unless it stays inside `folder`.

    A checkpoint names its other files (shards, external data) relative to itself; an absolute
    name, `..` or a symlink pointing out would make slimport read arbitrary files into the output.
    """
    where = where or folder
    if not isinstance(name, str) or not name or "\x00" in name:
        raise SlimportError(f"{where}: invalid file name {name!r}")
    root = Path(folder).resolve()
    target = (root / name).resolve()
    # the Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<sha>: the same model
    roots = (root, root.parent.parent / "blobs") if root.parent.name == "snapshots" else (root,)
    inside = any(target.is_relative_to(r) for r in roots)
    if Path(name).is_absolute() or ".." in Path(name).parts or not inside:
        raise SlimportError(
            f"{where}: refers to {name!r}, which lies outside the model folder {root}",
            hint="a checkpoint may only name files inside its own folder",
        )
    return target


def regular_file(path: Path) -> Path:
    """`path` if it is a regular file (after links); a FIFO or device would hang or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SlimportError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise SlimportError(f"{path}: {kind} where a checkpoint file is expected")
    return path


def parse_json(data: str | bytes, where: Path | str, what: str = "invalid JSON") -> object:
    """json.loads with every way it fails (bad bytes, bad syntax, nesting too deep) as one error."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise SlimportError(f"{where}: {what} ({reason})") from None


def element_count(shape, where: str) -> int:
    """Elements of a declared shape: each dimension a non-negative int, the product bounded."""
    if not isinstance(shape, list | tuple):
        raise SlimportError(f"{where}: shape {shape!r} is not a list of integers")
    n = 1
    for d in shape:
        # a dimension is bounded on its own too: [0, 2^64] has no elements but no valid shape
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_ELEMENTS:
            raise SlimportError(f"{where}: shape {list(shape)} has an invalid dimension {d!r}")
        n *= d
    if n > MAX_ELEMENTS:
        raise SlimportError(f"{where}: shape {list(shape)} declares {n} elements, beyond any model")
    return n


def read_shard_index(index: Path) -> dict[Path, set[str]]:
    """`*.index.json` of a sharded checkpoint -> {shard path: tensor names}, every shard present
    and inside the index's folder."""
    try:
        weight_map = parse_json(regular_file(index).read_bytes(), index, "not a valid shard index")[
            "weight_map"
        ]
        items = weight_map.items()
    except (OSError, KeyError, TypeError, AttributeError) as e:
        raise SlimportError(f"{index}: not a valid shard index ({e})") from None
    shards: dict[Path, set[str]] = {}
    for name, shard in items:
        if not isinstance(shard, str):
            raise SlimportError(f"{index}: weight_map entry {name!r} is not a file name")
        shards.setdefault(confined(index.parent, shard, index), set()).add(name)
    for path in shards:
        if not path.exists():
            raise SlimportError(
                f"{index}: shard {path.name} is missing",
                hint="every shard listed in the index must be present",
            )
        regular_file(path)
    return dict(sorted(shards.items()))


def check_shard(index: Path, shard: Path, listed: set[str], found) -> None:
    """A shard must hold exactly the tensors its index lists for it."""
    extra, absent = set(found) - listed, listed - set(found)
    if extra:
        raise SlimportError(
            f"{shard}: tensor(s) not listed for this shard in {index.name}: {name_list(extra)}"
        )
    if absent:
        raise SlimportError(
            f"{index}: tensor(s) listed for {shard.name} are absent from it: {name_list(absent)}"
        )


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` only if the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            raise IsADirectoryError(21, "is a folder", str(final))
    except OSError as e:
        raise _unwritable(final, e) from None
    remove_stale_partials(final)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(final), suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


STALE_AFTER_S = 24 * 3600  # a partial whose writer cannot be identified is stale after this


def _partial_prefix(final: Path) -> str:
    # the writer's pid in the name lets a later run tell a dead writer's leftovers from a live one's
    return f".{final.name}.{os.getpid()}-"


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete `.NAME.<pid>-*.partial` leftovers beside `final` whose writer is gone (kill -9,
    power loss), or, without a pid, older than a day. Returns what was removed."""
    head, removed = f".{final.name}.", []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for item in siblings:
        name = item.name
        if not (name.startswith(head) and name.endswith(".partial")):
            continue
        pid = name[len(head) :].split("-", 1)[0]
        try:
            stale = not _alive(int(pid)) if pid.isdigit() else _age(item) > STALE_AFTER_S
            if stale:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
                removed.append(item)
        except OSError:
            pass  # another run removed it first, or it is not ours to remove
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _age(path: Path) -> float:
    return time.time() - path.lstat().st_mtime


def _unwritable(path: Path, e: OSError) -> SlimportError:
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return SlimportError(
        f"{path}: output folder is not writable: {e.strerror}{where}",
        hint="choose an output path inside a folder you can write to",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(final: Path, overwrite: bool = False, source: Path | None = None) -> None:
    """Refuse an output folder that holds the input, or exists non-empty without `overwrite`.
    atomic_dir checks it; long runs call it first too, so a bad OUT fails before the work."""
    final = Path(final)
    if source is not None and Path(source).resolve().is_relative_to(final.resolve()):
        raise SlimportError(
            f"{final}: the output folder holds the input {source}; writing it would destroy it",
            hint="choose a new output folder",
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not final.is_dir():
            raise NotADirectoryError(20, "exists and is not a folder", str(final))
        occupied = final.is_dir() and any(final.iterdir())
    except OSError as e:
        raise _unwritable(final, e) from None
    if occupied and not overwrite:
        raise SlimportError(
            f"{final}: output folder exists and is not empty",
            hint="choose a new folder, or pass --overwrite to replace it as a whole",
        )


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `final`; it becomes `final` by one rename if the block succeeds.

    A non-empty existing `final` is refused (its files would mix with the new ones) unless
    `overwrite`, which replaces it as a whole. A `final` that holds `source` (the model being
    read) is always refused. Leftovers of earlier runs that were killed are removed first.
    """
    final = Path(final)
    check_output_dir(final, overwrite, source)
    remove_stale_partials(final)
    try:
        tmp = Path(
            tempfile.mkdtemp(prefix=_partial_prefix(final), suffix=".partial", dir=final.parent)
        )
    except OSError as e:
        raise _unwritable(final, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    if not final.exists() or not any(final.iterdir()):
        os.replace(tmp, final)  # rename(2) replaces an empty folder
        return
    old = Path(tempfile.mkdtemp(prefix=_partial_prefix(final), suffix=".partial", dir=final.parent))
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
