"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights with a per input
channel scale, so 8-bit activations lose less. Folding the scale in is scaling.fold_scales."""

from __future__ import annotations

import torch


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha), the weight max taken over every given
    Linear's column j (they share the input). Values are clamped at 1e-5 (as the reference
    code does) so a dead channel never divides by zero. Returns s [in]."""
    if not weights:
        raise ValueError("SmoothQuant: no weights to smooth into")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant: alpha {alpha} is outside [0, 1]")
    a = act_absmax.detach().float().reshape(-1)
    for w in weights:
        if w.ndim != 2 or w.shape[1] != a.numel():
            raise ValueError(
                f"SmoothQuant: weight {tuple(w.shape)} does not take the {a.numel()} channels of act_absmax"
            )
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    w_max = w_max.clamp(min=1e-5)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
