"""Dense linear layers at decode-sized M: a split-K Triton kernel (dense_gemv_triton.py) on CUDA,
`F.linear` (the reference) elsewhere and for larger M.

`GemvLinear` is an nn.Linear whose forward takes the kernel for M <= MAX_M rows; fuse_model turns
the model's dense projections into it when EMBER_DENSE_GEMV=1 (it stays an nn.Linear, so adapter
wrappers, state dicts and quantization see the same layer).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels._dispatch import use_triton

MAX_M = 4  # decode batches up to this many rows; larger ones go to cuBLAS


def dense_gemv_enabled() -> bool:
    """Whether fuse_model should route small-M dense projections through the Triton kernel."""
    return os.environ.get("EMBER_DENSE_GEMV", "").strip().lower() in ("1", "true", "yes")


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias): Triton on CUDA for M <= 16, else F.linear."""
    if x.shape[0] <= 16 and use_triton(x, weight):
        from engine.kernels.dense_gemv_triton import dense_gemv_triton

        return dense_gemv_triton(x.contiguous(), weight, bias)
    return F.linear(x, weight, bias)


class GemvLinear(nn.Linear):
    """nn.Linear whose small-M calls run the split-K kernel (same parameters, same results up to rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        if 0 < m <= MAX_M and use_triton(x, self.weight):
            return dense_gemv(x.reshape(m, k), self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def to_gemv_linear(layer: nn.Module) -> nn.Module:
    """Turn a plain nn.Linear into a GemvLinear in place (same object, same parameters); others unchanged."""
    if type(layer) is nn.Linear:
        layer.__class__ = GemvLinear
    return layer
