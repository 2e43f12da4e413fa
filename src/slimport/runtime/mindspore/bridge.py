"""torch <-> MindSpore tensors, and the process-wide MindSpore set-up every Cell needs first."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import mindspore as ms
import numpy as np
import torch


def _init_numpy_bridge() -> None:
    """MindSpore 2.10's wheel is built against NumPy 1.x: under NumPy 2 its first op that parses
    Python arguments fails once (SystemError, "Numpy init failed"); later calls work. Take that
    one failure here, at import, not in a user's first forward, and silence what it prints (a
    NumPy notice from Python, a "[WARNING] ... Numpy init failed" line from C++ on fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with contextlib.suppress(SystemError), contextlib.redirect_stderr(io.StringIO()):
                ms.ops.reshape(ms.Tensor(np.zeros(1, np.float32)), (1,))
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# On CPU, MindSpore's asynchronous PyNative dispatch stalls ~3 ms per op on small machines
# (stories260K forward 700 ms vs 22 ms synchronous); the choice only takes effect before the
# first op runs, so make it here, before _init_numpy_bridge's op.
if ms.get_context("device_target") == "CPU":
    if hasattr(getattr(ms, "runtime", None), "launch_blocking"):
        ms.runtime.launch_blocking()  # MindSpore >= 2.5's name for pynative_synchronize
    else:  # pragma: no cover - older MindSpore
        ms.set_context(pynative_synchronize=True)
_init_numpy_bridge()


def to_ms(t: torch.Tensor, dtype=ms.float32) -> ms.Tensor:
    """torch -> MindSpore without loss (bf16 goes through float32, exactly representable)."""
    if t.dtype == torch.bfloat16:
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16 if dtype == ms.bfloat16 else dtype)
    arr = t.numpy()
    out = ms.Tensor(arr)
    return out if not t.is_floating_point() or out.dtype == dtype else out.astype(dtype)


def from_ms(p) -> torch.Tensor:
    if p.dtype == ms.bfloat16:
        return torch.from_numpy(p.float().asnumpy()).to(torch.bfloat16)
    return torch.from_numpy(p.asnumpy())


def _torch_dtype(d) -> torch.dtype:
    return {ms.float32: torch.float32, ms.float16: torch.float16, ms.bfloat16: torch.bfloat16,
            ms.int32: torch.int32, ms.int64: torch.int64}[d]  # fmt: skip
