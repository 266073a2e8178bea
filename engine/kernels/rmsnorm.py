"""RMSNorm with an optional fused residual add, in the Llama reference's rounding order.

With a residual: h = x + residual (rounded to the activation dtype, as an unfused add would be),
out = w * (h * rsqrt(mean(h^2) + eps)).to(dtype); returns (out, h) where h is the next residual.
Without: returns (out, x). Statistics in fp32.
"""
from __future__ import annotations

import torch

from engine.kernels._dispatch import use_triton


def rms_scale(source: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(row^2) + eps) of each row of source [..., d], in fp32: [...]."""
    return torch.rsqrt(source.float().pow(2).mean(-1) + eps)


def rmsnorm_ref(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch fused add + RMSNorm over the last dim: (out, new_residual)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * rms_scale(h, eps)[..., None]
    return w * h.to(x.dtype), x


def rmsnorm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused add + RMSNorm: Triton on CUDA tensors (one read, two writes), the reference elsewhere."""
    if use_triton(x, w):
        from engine.kernels.rmsnorm_triton import rmsnorm_triton

        return rmsnorm_triton(x, w, eps, residual)
    return rmsnorm_ref(x, w, eps, residual)
