"""SwiGLU activation on a fused gate/up projection: x [..., 2I] -> silu(x[..., :I]) * x[..., I:].

The gate half comes first (gate_proj rows stacked above up_proj rows). silu is rounded to the
activation dtype before the product, as the unfused model computes it.

Optional RMS scale (`rms_source`, for a model whose RMSNorm weights were folded into the gate/up
projection, see engine/norm_folding.py): each row is first multiplied by rsqrt(mean(s^2) + eps)
of the matching row s of rms_source [..., d] and rounded to the activation dtype, as the product
of a normalized input would have been.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels._dispatch import use_triton
from engine.kernels.rmsnorm import rms_scale


def silu_and_mul_ref(x: torch.Tensor, rms_source: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Pure-torch SwiGLU: [..., 2I] -> [..., I] (rows first RMS-scaled by rms_source [..., d], if given)."""
    if rms_source is not None:
        x = (x.float() * rms_scale(rms_source, eps)[..., None]).to(x.dtype)
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def silu_and_mul(x: torch.Tensor, rms_source: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """SwiGLU: Triton on CUDA tensors, the reference elsewhere."""
    if use_triton(x):
        from engine.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x, rms_source, eps)
    return silu_and_mul_ref(x, rms_source, eps)
