"""Triton GEMV for dense bf16 / fp16 weights at M = 1 (batch-1 decode projections).

Why a kernel of our own when cuBLAS streams large weights at copy speed: at batch 1 a decode layer
is a chain of short kernels, and the small projections (a 1B model's q/k/v and o: 8-13 MB) take
~6 us in cuBLAS, mostly ramp-up, one DRAM round trip and (for down_proj) a split-K reduction
launch. This kernel runs under programmatic dependent launch like the rest of the decode path:
its programs start while the previous kernel still runs and request their first weight tiles
before they wait for its output (`wait_for_inputs`), so that latency overlaps the previous
kernel's tail; the residual add of a folded layer happens in its epilogue (ACCUMULATE), and
split-K partials are reduced in the same launch (quant_split_triton.py).

- A program owns BLOCK_N rows of W and a slice of K, in steps of 2 WORDS columns read as 32-bit
  words: each thread loads 16-byte runs (4 words, 8 values) of rows and widens each word's two
  bf16 values to fp32 with one shift and one mask, then multiplies them by the matching
  activations (one 16-byte load a step, shared by the rows the thread holds): ~2 instructions a
  weight (1.24 a byte in the compiled loop, sass_report.py; the packed-half int4 GEMV: 5.3).
- Products accumulate in fp32 per (row, word) lane, 32 lanes a thread in the swept tiles (~165
  registers, no spills); the cross-thread sum runs once, at the end.
- Weights stream through a two-step register ring (PREFETCH = 2) as in the quantized GEMVs; its
  first two steps are requested before the wait. Loads are unmasked: rows past N re-read row
  N - 1, steps past the slice re-read its last step; neither is ever stored.
- Bytes: N K 2 of weights, K 2 of activations, N 2 of output (plus, with a split, 2 x 4 N of fp32
  partials). Flops: 2 N K. At batch 1 that is one flop a byte: memory-bound by far.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import pdl_launch, wait_for_inputs
from engine.kernels.quant_split_triton import split_fixup, split_scratch, store_rows


@triton.jit
def _widen(v, IS_BF16: tl.constexpr):
    """int32 words holding two 16-bit floats (columns 2 w, 2 w + 1) -> (low, high) as fp32.

    bf16: a shift and a mask (the bf16 bits are the high half of an fp32); Triton's own bf16
    conversion spends a PRMT and a shift on each value. fp16 converts.
    """
    if IS_BF16:
        return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


@triton.jit
def _dense_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, steps, steps_per_split,
    stride_xm, stride_wn, stride_om,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, IS_BF16: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
    PDL: tl.constexpr,
):
    # x and W are read as int32 words of two columns; a step is WORDS words (2 WORDS columns) a row.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.arange(0, WORDS)
    rows = tl.minimum(n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + wi[None, :]  # [BLOCK_N, WORDS]
    # The activations' pointers are [BLOCK_N, WORDS] too (equal along rows): the load then takes the
    # weights' register layout, and the compiler issues one load per thread for the rows it holds.
    # A [WORDS] load broadcast along rows got its own layout and went through shared memory.
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + tl.zeros([BLOCK_N, 1], tl.int32) + wi[None, :]
    first = pid_k * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    end = last - 1
    if PREFETCH == 2:  # weights only: no kernel writes them, so they may be read before the wait
        w_a = tl.load(w_ptrs + first * WORDS)
        w_b = tl.load(w_ptrs + tl.minimum(first + 1, end) * WORDS)
    wait_for_inputs(PDL)
    acc = tl.zeros([BLOCK_N, WORDS], tl.float32)
    for st in tl.range(first, last, loop_unroll_factor=UNROLL):  # 3 copies rotate the ring in place
        if PREFETCH == 2:
            wv = w_a
            w_a = w_b
            w_b = tl.load(w_ptrs + tl.minimum(st + 2, end) * WORDS)
        else:
            wv = tl.load(w_ptrs + st * WORDS)
        x_lo, x_hi = _widen(tl.load(x_ptrs + st * WORDS), IS_BF16)
        w_lo, w_hi = _widen(wv, IS_BF16)
        acc += w_lo * x_lo
        acc += w_hi * x_hi
    total = tl.sum(acc, 1)  # [BLOCK_N]
    m = pid_m + tl.arange(0, 1)
    store_rows(total[None, :], m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)


def dense_gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
               block_n: int, block_k: int, num_warps: int, split: int, per_split: int, prefetch: int = 2,
               accumulate: bool = False) -> torch.Tensor:
    """Launch the GEMV: x2 [M, K] and weight [N, K], 16-bit, unit column stride, 4-byte aligned rows
    (K a multiple of block_k, an even number of columns); out [M, N] written (accumulate=True:
    added to); `split` K slices of `per_split` steps of block_k columns each (the caller's choice)."""
    m, k = x2.shape
    n_out = weight.shape[0]
    assert k % block_k == 0 and block_k % 2 == 0 and weight.stride(-1) == 1 and x2.stride(-1) == 1, (k, block_k)
    assert x2.dtype == weight.dtype and x2.dtype in (torch.bfloat16, torch.float16), (x2.dtype, weight.dtype)
    if x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    assert weight.stride(0) % 2 == 0 and weight.data_ptr() % 4 == 0
    tiles = triton.cdiv(n_out, block_n) * m
    part, locks = split_scratch(out, split, tiles, weight)
    grid = (triton.cdiv(n_out, block_n), m, split)
    _dense_gemv_kernel[grid](
        x2.view(torch.int32), weight.view(torch.int32), bias if bias is not None else out, out, part, locks, m,
        n_out, k // block_k, per_split, x2.stride(0) // 2, weight.stride(0) // 2, out.stride(0),
        BLOCK_N=block_n, WORDS=block_k // 2, SPLIT=split > 1, HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        IS_BF16=x2.dtype == torch.bfloat16, PREFETCH=prefetch, UNROLL=3 if prefetch == 2 else 1,
        num_warps=num_warps, num_stages=1, **pdl_launch(x2.device, early_trigger=False),
    )
    return out
