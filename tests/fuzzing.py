"""Fuzzing the checkpoint readers: seed files, byte-level mutations, and the one property every
reader must have: any input either reads (every tensor loads) or raises SlimportError, within
10 s and without growing the process by 1 GB. Used by tests/test_fuzz_readers.py (bounded, in
CI) and benchmarks/fuzz_readers.py (long runs)."""

from __future__ import annotations

import random
import resource
import struct
import time
from pathlib import Path

from slimport.errors import SlimportError
from slimport.io.auto import open_checkpoint

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
# reader (a --from format) -> the seed files of tests/fuzz_corpus it is fuzzed with
READERS = {
    "safetensors": ("tiny.safetensors",),
    "gguf": ("tiny.gguf",),
    "llama2c": ("tiny.llama2c.bin",),
    "pytorch": ("tiny_zip.bin", "tiny_legacy.bin"),
    "keras": ("tiny.h5",),
    "mindspore": ("tiny.ckpt",),
}
SUFFIX = {
    "safetensors": ".safetensors",
    "gguf": ".gguf",
    "llama2c": ".bin",
    "pytorch": ".bin",
    "keras": ".h5",
    "mindspore": ".ckpt",
}
MAX_SECONDS = 10
MAX_GROWTH_KB = 1024 * 1024  # 1 GB of peak RSS above the start of the run
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFFFFFF, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1)


class Finding(Exception):
    """An input that broke the property: the exception, the time or the memory it took."""


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 edits of the kinds that find reader bugs: flipped bytes, cut files, lying integers
    (counts, lengths, offsets) written over any aligned field, duplicated and dropped spans."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(max(len(b), 1))
        if kind == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del b[rng.randrange(len(b) + 1) :]
        elif kind == 2 and len(b) >= 8:  # an interesting integer over a 4- or 8-byte field
            width = rng.choice((4, 8))
            pos = rng.randrange(0, len(b) - width + 1) // 4 * 4
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            b[pos : pos + width] = struct.pack("<I" if width == 4 else "<Q", value)
        elif kind == 3:
            b[pos:pos] = b[pos : pos + rng.randint(1, 64)]
        elif kind == 4:
            del b[pos : pos + rng.randint(1, 64)]
        else:
            b[pos : pos + 1] = bytes([rng.randrange(256)])
    return bytes(b)


def peak_kb() -> int:
    """Peak RSS of this process so far (KB): growth past it is what an input made us allocate."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check(path: Path, fmt: str, baseline_kb: int) -> str:
    """Read `path` as `fmt`, every tensor; "ok" or "refused", else raise Finding."""
    t0 = time.perf_counter()
    try:
        with open_checkpoint(path, fmt) as ckpt:
            for name in ckpt.names():
                ckpt.load(name)
        outcome = "ok"
    except SlimportError:
        outcome = "refused"
    except Exception as e:  # noqa: BLE001 - the property under test: nothing else may escape
        raise Finding(f"{fmt}: {type(e).__name__}: {str(e)[:300]}") from e
    seconds = time.perf_counter() - t0
    if seconds > MAX_SECONDS:
        raise Finding(f"{fmt}: took {seconds:.1f} s")
    if peak_kb() - baseline_kb > MAX_GROWTH_KB:
        raise Finding(f"{fmt}: peak RSS grew by {(peak_kb() - baseline_kb) // 1024} MB")
    return outcome


def seeds(fmt: str) -> list[bytes]:
    return [(CORPUS / name).read_bytes() for name in READERS[fmt]]


def make_corpus(folder: Path = CORPUS) -> None:
    """Write the seed files (a few hundred bytes to a few KB each)."""
    import gguf
    import h5py
    import numpy as np
    import torch

    from slimport.io import mindspore_ckpt, safetensors
    from slimport.io.base import Ready

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(4, generator=g).half()
    safetensors.write(folder / "tiny.safetensors", [Ready("a", a), Ready("b", b)])
    mindspore_ckpt.write(folder / "tiny.ckpt", [Ready("a", a), Ready("b", b)])
    torch.save({"a": a, "b": b, "step": 3}, folder / "tiny_zip.bin")
    torch.save({"a": a, "b": b}, folder / "tiny_legacy.bin", _use_new_zipfile_serialization=False)
    w = gguf.GGUFWriter(folder / "tiny.gguf", "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_token_list(["<s>", "a", "b"])
    w.add_tensor("f32", a.numpy())
    q = gguf.quants.quantize(
        np.linspace(-1, 1, 32, dtype=np.float32)[None], gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    dim, hidden, layers, heads, kv, vocab, seq = 4, 4, 1, 2, 1, 4, 2
    n = vocab * dim + layers * (
        2 * dim + 2 * dim * dim + 2 * dim * dim // heads * kv + 3 * dim * hidden
    )
    n += dim + seq * dim // heads  # final norm, the two half-width RoPE tables
    header = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)
    (folder / "tiny.llama2c.bin").write_bytes(header + np.linspace(-1, 1, n, dtype="<f4").tobytes())
    with h5py.File(folder / "tiny.h5", "w", libver="latest") as f:  # smallest file
        f.attrs["layer_names"] = [b"dense"]
        group = f.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        group["dense/kernel:0"] = a.numpy()
        group["dense/bias:0"] = np.zeros(3, dtype=np.float32)
