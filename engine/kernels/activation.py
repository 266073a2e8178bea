"""SwiGLU activation on a fused gate/up projection: x [..., 2I] -> silu(x[..., :I]) * x[..., I:].

The gate half comes first (gate_proj rows stacked above up_proj rows). silu is rounded to the
activation dtype before the product, as the unfused model computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels._dispatch import use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch SwiGLU: [..., 2I] -> [..., I]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: Triton on CUDA tensors, the reference elsewhere."""
    if use_triton(x):
        from engine.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
