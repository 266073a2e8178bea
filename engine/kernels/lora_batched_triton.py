"""Triton batched LoRA (semantics in lora_batched.py): a "shrink" kernel t = x A^T and an "expand" kernel
y += s * t B^T, both over chunks of tokens that share an adapter slot.

Shrink: a program owns one chunk (<= BLOCK_M tokens of one slot) and a slice of K; the rank is small
(16-64), so a decode step has few chunks and K is split across programs to fill the GPU; fp32
partials [SPLIT, L, BLOCK_R] are summed by the expand kernel (deterministic, no atomics).
Expand: a program owns one chunk and BLOCK_N output columns; it sums the chunk's partials (a few
KB), reads y's rows, adds the update in
fp32, applies the DoRA rescale if asked, and writes the rows back. Each token belongs to exactly one
chunk, so no two programs write the same element. Base tokens (slot -1) are in no chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import dot_precision, num_sms
from engine.kernels.lora_batched import LoraSegments

SHRINK_BLOCK_K = 128
EXPAND_BLOCK_N = 128


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, part_ptr, rows_ptr, cslot_ptr, cstart_ptr, clen_ptr,
    K, R, k_per_split,
    stride_xm, stride_as, stride_ar, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(cslot_ptr + chunk).to(tl.int64)
    start = tl.load(cstart_ptr + chunk)
    count = tl.load(clen_ptr + chunk)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_hi = tl.where(count > 0, k_hi, k_lo)  # an empty chunk (fixed CUDA-graph grids) does no work
    a_base = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + r[:, None] * stride_ar + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                     other=0.0)  # [BLOCK_R, BLOCK_K]
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PREC)  # [BLOCK_M, BLOCK_R]
    out = part_ptr + split * stride_ps + (start + m)[:, None] * stride_pm + r[None, :]
    tl.store(out, acc, mask=m_ok[:, None])


@triton.jit
def _expand_kernel(
    part_ptr, b_ptr, y_ptr, scale_ptr, rescale_ptr, rows_ptr, cslot_ptr, cstart_ptr, clen_ptr,
    N, R, splits,
    stride_ps, stride_pm, stride_bs, stride_bn, stride_ym, stride_gs,
    HAS_RESCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(cslot_ptr + chunk).to(tl.int64)
    start = tl.load(cstart_ptr + chunk)
    count = tl.load(clen_ptr + chunk)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    r = tl.arange(0, BLOCK_R)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for sk in range(0, splits):  # the shrink's split-K partials, summed here rather than by another kernel
        t += tl.load(part_ptr + sk * stride_ps + (start + m)[:, None] * stride_pm + r[None, :], mask=m_ok[:, None],
                     other=0.0)
    r_lim = tl.where(count > 0, R, 0)  # an empty chunk (fixed CUDA-graph grids) reads no B
    bt = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + r[None, :],
                 mask=n_ok[:, None] & (r[None, :] < r_lim), other=0.0)  # [BLOCK_N, BLOCK_R]
    upd = tl.dot(t.to(bt.dtype), tl.trans(bt), input_precision=PREC)  # [BLOCK_M, BLOCK_N] fp32
    upd = upd * tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + upd
    if HAS_RESCALE:
        g = tl.load(rescale_ptr + slot * stride_gs + n, mask=n_ok, other=1.0)
        out = out * g[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


def _split_k(k: int, num_chunks: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split): enough programs for about two waves, each split a whole number of K blocks."""
    k_blocks = triton.cdiv(k, SHRINK_BLOCK_K)
    want = max(1, min(k_blocks, triton.cdiv(2 * num_sms(device), num_chunks)))
    per_split = triton.cdiv(k_blocks, want) * SHRINK_BLOCK_K
    return triton.cdiv(k, per_split), per_split


def lora_batched_triton(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
                        scaling: torch.Tensor, rescale: torch.Tensor | None = None) -> torch.Tensor:
    """In place on y [N, N_out]; returns y. See lora_batched.add_lora for the shapes."""
    n_out, k = y.shape[1], x.shape[1]
    r = a.shape[1]
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1
    assert a.dtype == b.dtype == x.dtype, "adapter stacks must be in the activation dtype"
    assert scaling.dtype == torch.float32 and (rescale is None or rescale.dtype == torch.float32)
    num_rows, num_chunks = seg.num_rows, seg.num_chunks
    block_r = max(16, triton.next_power_of_2(r))
    prec = dot_precision(x.dtype)
    splits, per_split = _split_k(k, num_chunks, x.device)
    part = torch.empty(splits, num_rows, block_r, device=x.device, dtype=torch.float32)
    _shrink_kernel[(num_chunks, splits)](
        x, a, part, seg.rows, seg.chunk_slot, seg.chunk_start, seg.chunk_len,
        k, r, per_split,
        x.stride(0), a.stride(0), a.stride(1), part.stride(0), part.stride(1),
        BLOCK_M=seg.block_m, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, PREC=prec, num_warps=4,
    )
    g = rescale if rescale is not None else scaling  # unused pointer when there is no rescale
    _expand_kernel[(num_chunks, triton.cdiv(n_out, EXPAND_BLOCK_N))](
        part, b, y, scaling, g, seg.rows, seg.chunk_slot, seg.chunk_start, seg.chunk_len,
        n_out, r, splits,
        part.stride(0), part.stride(1), b.stride(0), b.stride(1), y.stride(0), g.stride(0),
        HAS_RESCALE=rescale is not None, BLOCK_M=seg.block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r,
        PREC=prec, num_warps=4,
    )
    return y
