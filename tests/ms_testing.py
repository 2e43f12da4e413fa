"""Helpers shared by the MindSpore runtime tests."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import torch


def maxdiff(a, b) -> float:
    """max |a - b| in float64, for MindSpore / torch / NumPy arrays alike."""
    a = a.asnumpy() if isinstance(a, ms.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
