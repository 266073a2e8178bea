"""Triton split-K matmul for decode-sized M with dense bf16/fp16 weights: y = x @ W.T (+ bias).

Why: at M = 1 cuBLAS tiles a small projection (a 1B model's q/k/v or o, 8-12 MB) into as few as
32-48 programs, far too few for 132 SMs, and streams its weights at 1.4-2.1 TB/s. Here every
program owns BLOCK_N output rows and a slice of K, with enough slices to put ~3 programs on each
SM; the rows of x (M <= 16, padded by masking) meet a [BLOCK_N, BLOCK_K] tile of W in one tensor
core dot per step, so Triton's pipeliner keeps several weight tiles in flight. Split-K partials
are reduced in the same launch by the last program to arrive (quant_split_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import dot_precision, num_sms
from engine.kernels.quant_split_triton import split_fixup, split_locks, store_rows

BLOCK_M = 16  # tl.dot's smallest tile: rows past M are masked
BLOCK_N = 64
BLOCK_K = 128
PROGRAMS_PER_SM = 3
MIN_STEPS = 2  # K steps a slice at least (a split shorter than that only adds partial traffic)


@triton.jit
def _dense_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + m[:, None] * stride_xm + kk[None, :]
    w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + kk) < k_hi
        xt = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PREC)
    store_rows(acc, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS)
    if SPLIT:
        split_fixup(lock_ptr, pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N, stride_om, HAS_BIAS)


def choose_splits(n: int, k: int, sms: int) -> int:
    """K slices: about PROGRAMS_PER_SM programs an SM, each slice at least MIN_STEPS steps of BLOCK_K."""
    tiles = triton.cdiv(n, BLOCK_N)
    steps = triton.cdiv(k, BLOCK_K)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, tiles)
    return max(1, min(want, steps // MIN_STEPS))


def dense_gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) @ weight [N, K].T (+ bias) -> [M, N] in x's dtype; fp32 accumulation."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= BLOCK_M and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if splits is None:
        splits = choose_splits(n, k, num_sms(x.device))
    steps = triton.cdiv(k, BLOCK_K)
    per_split = triton.cdiv(steps, splits) * BLOCK_K
    splits = triton.cdiv(k, per_split)
    split = splits > 1
    tiles = triton.cdiv(n, BLOCK_N)
    part = torch.empty(splits, m, n, device=x.device, dtype=torch.float32) if split else out
    locks = split_locks(x.device, tiles) if split else out
    _dense_gemv_kernel[(tiles, 1, splits)](
        x, weight, bias if bias is not None else out, out, part, locks,
        m, n, k, per_split,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT=split, HAS_BIAS=bias is not None,
        PREC=dot_precision(x.dtype), num_warps=4, num_stages=4,
    )
    return out
