"""The reader interface every checkpoint format implements, and atomic output files."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
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


def read_shard_index(index: Path) -> dict[Path, set[str]]:
    """`*.index.json` of a sharded checkpoint -> {shard path: tensor names}, every shard present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[Path, set[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(index.parent / shard, set()).add(name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SlimportError(f"{index}: not a valid shard index ({e})") from None
    for path in shards:
        if not path.exists():
            raise SlimportError(
                f"{index}: shard {path.name} is missing",
                hint="every shard listed in the index must be present",
            )
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
    except OSError as e:
        raise _unwritable(final, e) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; files land in `final` only if the block succeeds.

    Existing files in `final` that the block does not write are left alone.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not final.is_dir():
            raise NotADirectoryError(20, "exists and is not a folder", str(final))
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as e:
        raise _unwritable(final, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        final.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, final / item.name)
    finally:
        for item in sorted(tmp.rglob("*"), reverse=True):
            item.unlink() if item.is_file() else item.rmdir()
        tmp.rmdir()
