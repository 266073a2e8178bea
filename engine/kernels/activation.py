"""SwiGLU activation on a fused gate/up projection: x [..., 2I] -> silu(x[..., :I]) * x[..., I:].

The gate half comes first (gate_proj rows stacked above up_proj rows). silu is rounded to the
activation dtype before the product, as the unfused model computes it.

An optional `delta` of x's shape (adapter updates of the gate/up projection, computed beside it) is
added to x first, the sum rounded to the activation dtype as the projection's own output would be.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels._dispatch import use_triton


def silu_and_mul_ref(x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch SwiGLU of x (+ delta): [..., 2I] -> [..., I]."""
    if delta is not None:
        x = x + delta
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def silu_and_mul(x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of x (+ delta): Triton on CUDA tensors, the reference elsewhere."""
    if use_triton(x):
        from engine.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x, delta)
    return silu_and_mul_ref(x, delta)
