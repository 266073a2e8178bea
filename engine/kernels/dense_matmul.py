"""Dense projections of the decode path: the Triton GEMV at batch 1 on CUDA, torch elsewhere.

`dense_linear(x, weight, bias, accumulate)` is x @ weight.T (+ bias), optionally added in place into
`accumulate` (a residual stream). One activation row of bf16 / fp16 on CUDA runs the GEMV of
dense_gemv_triton.py when EMBER_DENSE_GEMV=1 (launch shape from quant_tuning.tile_config with
bits = DENSE_BITS: measured winners, else a heuristic); everything else (more rows, fp32, CPU,
EMBER_DISABLE_TRITON=1, the switch off, or a shape whose measured entry says "cublas") is F.linear /
addmm_, i.e. cuBLAS on a GPU. The reference is the same torch call, so the CPU path is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import env_switch
from engine.kernels._dispatch import use_triton
from engine.kernels.quant_tuning import DENSE_BITS, tile_config

GEMV_MAX_ROWS = 1  # activation rows up to which the GEMV runs (more: cuBLAS's tensor-core GEMM)
MIN_BLOCK_K = 64  # the GEMV's narrowest step; K must be a multiple of it


def dense_gemv_enabled() -> bool:
    """EMBER_DENSE_GEMV=1 sends batch-1 dense projections on CUDA to the Triton GEMV; off by default
    (cuBLAS) until a decode A/B on the GPU shows a gain (benchmarks/NOTES.md)."""
    return env_switch("EMBER_DENSE_GEMV") is True


def _gemv_applies(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    return (0 < x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x2.dtype and weight.dim() == 2 and weight.stride(-1) == 1
            and x2.shape[1] % MIN_BLOCK_K == 0 and use_triton(x2, weight) and dense_gemv_enabled())


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 accumulate: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) -> [..., N] in x's dtype. With `accumulate` (x's dtype,
    rows viewing as [M, N] with unit column stride, not overlapping x) the product is added into it
    in place, rounded once, and it is returned. `config` (a quant_tuning.TileConfig) overrides the
    GEMV's launch shape (benchmark sweeps, tests)."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    cfg = None
    if _gemv_applies(x2, weight):
        cfg = config or tile_config(x2.shape[0], n, k, DENSE_BITS)
    if cfg is None or cfg.kernel == "cublas":
        if accumulate is None:
            return F.linear(x, weight, bias)
        acc2 = accumulate.view(-1, n)
        acc2.addmm_(x2, weight.t())
        if bias is not None:
            acc2.add_(bias)
        return accumulate
    from engine.kernels.dense_gemv_triton import dense_gemv
    from engine.kernels.quant_matmul_triton import split_plan

    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype) if accumulate is None else accumulate.view(m, n)
    block_k = cfg.block_k
    while k % block_k:  # a power of two dividing K (MIN_BLOCK_K does)
        block_k //= 2
    split, per_split = split_plan(-(-n // cfg.block_n) * m, k // block_k, cfg, x.device)
    dense_gemv(x2, weight, bias, out, cfg.block_n, block_k, cfg.num_warps, split, per_split,
               prefetch=2 if cfg.prefetch else 0, accumulate=accumulate is not None)
    return out.view(*x.shape[:-1], n) if accumulate is None else accumulate
