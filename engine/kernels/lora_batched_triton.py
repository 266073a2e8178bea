"""Triton batched LoRA (semantics in lora_batched.py): a "shrink" kernel t = x A^T and an "expand" kernel
y += s * t B^T, both over chunks of tokens that share an adapter slot.

Shrink: a program owns one chunk (<= BLOCK_M tokens of one slot) and a slice of K; the rank is small
(16-64), so a decode step has few chunks and K is split across programs to fill the GPU; fp32
partials [SPLIT, L, BLOCK_R] are summed by the expand kernel (deterministic, no atomics). The split
count is capped at MAX_SPLITS, so the expand sums them in a short unrolled run of independent loads.
Expand: a program owns one chunk and a run of BLOCK_N-column tiles; it sums the chunk's partials (a
few KB) once, then per tile reads B and y's rows, adds the update in fp32, applies the DoRA rescale if
asked, and writes the rows back. Each token belongs to exactly one chunk, so no two programs write the
same element. Base tokens (slot -1) are in no chunk. Instead of partials the expand can read x A^T
from a [tokens, slots x R] product (BY_ROW: the base GEMM's extra columns, lora_serving.py), each
token at its own row and its slot's columns. A packed layer's B is block-diagonal (`slices`): the expand works
slice by slice and reads only each slice's own rank columns, a half or a third of B's bytes.

Empty chunks (chunk_len 0: the spare entries of a CUDA graph's fixed grid) return at once.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import dot_precision, num_sms
from engine.kernels.lora_batched import LoraSegments, slice_spans

SHRINK_BLOCK_K = 128
MAX_SPLITS = 8  # split-K partials the expand sums (unrolled): enough programs for decode, few registers
NARROW_BLOCK_N = 128
EXPAND_PROGRAMS_PER_SM = 4


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, part_ptr, rows_ptr, cslot_ptr, cstart_ptr, clen_ptr,
    K, R, k_per_split,
    stride_xm, stride_as, stride_ar, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    count = tl.load(clen_ptr + chunk)
    slot = tl.load(cslot_ptr + chunk).to(tl.int64)  # loaded with the count: one round trip, not two
    start = tl.load(cstart_ptr + chunk)
    if count == 0:  # a spare entry of a fixed CUDA-graph grid
        return
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
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
def _slice_partials(part_ptr, start, m, m_ok, rows, slot, r, r_ok, i, slice_rank, stride_ps, stride_pm,
                    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, FULL_R: tl.constexpr,
                    BY_ROW: tl.constexpr):
    """Slice i's rank columns of the chunk's x A^T, [BLOCK_M, BLOCK_R] fp32: the sum of the shrink's
    split-K partials (the splits unrolled, so that their loads are in flight together), or with BY_ROW
    the token rows of a [tokens, slots x R] product (the base GEMM's extra columns), at the slot's columns."""
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    mask = m_ok[:, None] if FULL_R else m_ok[:, None] & r_ok[None, :]
    if BY_ROW:
        t += tl.load(part_ptr + slot * stride_ps + rows[:, None] * stride_pm + i * slice_rank + r[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    else:
        for sk in tl.static_range(SPLITS):
            t += tl.load(part_ptr + sk * stride_ps + (start + m)[:, None] * stride_pm + i * slice_rank + r[None, :],
                         mask=mask, other=0.0)
    return t


@triton.jit
def _expand_kernel(
    part_ptr, b_ptr, y_ptr, scale_ptr, rescale_ptr, rows_ptr, cslot_ptr, cstart_ptr, clen_ptr,
    N, slice_rank, off1, off2, tiles_per_program,
    stride_ps, stride_pm, stride_bs, stride_bn, stride_ym, stride_gs,
    HAS_RESCALE: tl.constexpr, SPLITS: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr, FULL_R: tl.constexpr, BY_ROW: tl.constexpr,
):
    # FULL_R: the slice rank fills BLOCK_R, so no mask runs along the rank (contiguous) axis and the
    # partials' and B's rows load as whole vectors rather than element by element.
    chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.load(clen_ptr + chunk)
    slot = tl.load(cslot_ptr + chunk).to(tl.int64)  # loaded with the count: one round trip, not two
    start = tl.load(cstart_ptr + chunk)
    if count == 0:  # a spare entry of a fixed CUDA-graph grid
        return
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)  # rank columns of one slice
    r_ok = r < slice_rank
    # The chunk's rank vectors, once for all of the program's tiles (a slice's t is zero-cost when unused).
    t0 = _slice_partials(part_ptr, start, m, m_ok, rows, slot, r, r_ok, 0, slice_rank, stride_ps,
                         stride_pm, SPLITS, BLOCK_M, BLOCK_R, FULL_R, BY_ROW)
    if NUM_SLICES > 1:
        t1 = _slice_partials(part_ptr, start, m, m_ok, rows, slot, r, r_ok, 1, slice_rank, stride_ps,
                             stride_pm, SPLITS, BLOCK_M, BLOCK_R, FULL_R, BY_ROW)
    if NUM_SLICES > 2:
        t2 = _slice_partials(part_ptr, start, m, m_ok, rows, slot, r, r_ok, 2, slice_rank, stride_ps,
                             stride_pm, SPLITS, BLOCK_M, BLOCK_R, FULL_R, BY_ROW)
    scale = tl.load(scale_ptr + slot)
    b_base = b_ptr + slot * stride_bs
    # A program walks `tiles_per_program` consecutive BLOCK_N tiles: the round trips above are paid
    # once, and B's tiles (they feed a dot) are pipelined across the loop.
    first = pid_n * tiles_per_program * BLOCK_N
    last = tl.minimum(first + tiles_per_program * BLOCK_N, N)
    for n_lo in range(first, last, BLOCK_N):
        n = n_lo + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Slice i owns output rows [lo, hi) and rank columns [i * slice_rank, (i + 1) * slice_rank): B is
        # zero elsewhere, so each slice is a small dot over its own columns, its rows outside [lo, hi)
        # masked (never read). No branch on the tile: a straight loop body keeps B's loads pipelined.
        for i in tl.static_range(NUM_SLICES):
            if i == 0:
                lo, hi, t = 0, off1, t0
            elif i == 1:
                lo, hi, t = off1, off2, t1
            else:
                lo, hi, t = off2, N, t2
            b_ok = (n_ok & (n >= lo) & (n < hi))[:, None]
            if not FULL_R:
                b_ok = b_ok & r_ok[None, :]
            bt = tl.load(b_base + n[:, None] * stride_bn + i * slice_rank + r[None, :], mask=b_ok,
                         other=0.0)  # [BLOCK_N, BLOCK_R]
            acc = tl.dot(t.to(bt.dtype), tl.trans(bt), acc, input_precision=PREC)  # [BLOCK_M, BLOCK_N]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale
        if HAS_RESCALE:
            g = tl.load(rescale_ptr + slot * stride_gs + n, mask=n_ok, other=1.0)
            out = out * g[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


def split_k(k: int, num_chunks: int, sms: int) -> tuple[int, int]:
    """(splits, K per split): about two waves of programs, at most MAX_SPLITS, whole K blocks each."""
    k_blocks = triton.cdiv(k, SHRINK_BLOCK_K)
    want = max(1, min(k_blocks, MAX_SPLITS, triton.cdiv(2 * sms, num_chunks)))
    per_split = triton.cdiv(k_blocks, want) * SHRINK_BLOCK_K
    return triton.cdiv(k, per_split), per_split


def expand_tile(n_out: int, num_chunks: int, block_m: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, warps, tiles per program) of the expand.

    A program's time is mostly latency (the chunk; its rows and partials; then B and y per tile), so
    decode launches aim at about EXPAND_PROGRAMS_PER_SM programs an SM, each walking several tiles
    in a pipelined loop, rather than one short program per tile (32 adapters over 64 tokens and
    16k outputs made 2,048 programs of one tile each)."""
    if block_m > 16:
        return NARROW_BLOCK_N, 8, 1  # prefill: 64-row tiles; 8 warps keep them at ~128 registers
    tiles = triton.cdiv(n_out, NARROW_BLOCK_N)
    per_program = max(1, min(tiles, (tiles * num_chunks) // (EXPAND_PROGRAMS_PER_SM * sms)))
    return NARROW_BLOCK_N, 4, per_program


def _slice_bounds(n_out: int, r: int, slices: Sequence[int] | None) -> tuple[int, int, int]:
    """(rank per slice, start of slice 1, start of slice 2) of lora_batched's spans; absent slices start at n_out."""
    assert not slices or len(slices) == 1 or (len(slices) <= 3 and r % len(slices) == 0 and slices[0] == 0), \
        f"unsupported slices {slices}"
    spans = slice_spans(n_out, r, slices)
    starts = [lo for lo, _, _, _ in spans[1:]] + [n_out] * (3 - len(spans))
    return spans[0][3] - spans[0][2], starts[0], starts[1]


def shrink_partials(x: torch.Tensor, seg: LoraSegments, a: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer for the shrink's partials of x A^T: fp32 [splits, rows, BLOCK_R]."""
    splits, _ = split_k(x.shape[1], seg.num_chunks, num_sms(x.device))
    return torch.empty(splits, seg.num_rows, max(16, triton.next_power_of_2(a.shape[1])), device=x.device,
                       dtype=torch.float32)


def lora_shrink_triton(x: torch.Tensor, seg: LoraSegments, a: torch.Tensor,
                       part: torch.Tensor | None = None) -> torch.Tensor:
    """The shrink alone: fills (and returns) `part` (shrink_partials' buffer, made here if None).

    Only x and A are read, so it may run on a side stream beside the base projection; allocating
    `part` on the main stream first keeps its memory owned by that stream (lora_serving.py).
    """
    k, r = x.shape[1], a.shape[1]
    assert x.stride(1) == 1 and a.stride(2) == 1 and a.dtype == x.dtype
    num_chunks = seg.num_chunks
    block_r = max(16, triton.next_power_of_2(r))
    splits, per_split = split_k(k, num_chunks, num_sms(x.device))
    part = shrink_partials(x, seg, a) if part is None else part
    assert part.shape == (splits, seg.num_rows, block_r) and part.dtype == torch.float32
    _shrink_kernel[(num_chunks, splits)](
        x, a, part, seg.rows, seg.chunk_slot, seg.chunk_start, seg.chunk_len,
        k, r, per_split,
        x.stride(0), a.stride(0), a.stride(1), part.stride(0), part.stride(1),
        BLOCK_M=seg.block_m, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, PREC=dot_precision(x.dtype), num_warps=4,
    )
    return part


def lora_expand_triton(y: torch.Tensor, part: torch.Tensor, seg: LoraSegments, b: torch.Tensor,
                       scaling: torch.Tensor, rescale: torch.Tensor | None = None,
                       slices: Sequence[int] | None = None) -> torch.Tensor:
    """The expand alone, in place on y [N, N_out]: y += s * t B^T (then * rescale), t the chunk's x A^T from
    `part`: the shrink's fp32 partials [splits, rows, BLOCK_R], or a 2-D [N, slots x R] product in x's
    dtype whose row i, columns slot x R .. (slot + 1) x R, hold token i's x A[slot]^T (lora_expand_ref)."""
    n_out, r = y.shape[1], b.shape[2]
    by_row = part.dim() == 2
    if by_row:
        assert part.shape[0] == y.shape[0] and part.shape[1] % r == 0 and part.stride(1) == 1
        stride_ps, stride_pm, splits = r, part.stride(0), 1  # slot stride, token-row stride
    else:
        stride_ps, stride_pm, splits = part.stride(0), part.stride(1), part.shape[0]
    assert y.stride(1) == 1 and b.stride(2) == 1 and b.dtype == y.dtype
    assert scaling.dtype == torch.float32 and (rescale is None or rescale.dtype == torch.float32)
    slice_rank, off1, off2 = _slice_bounds(n_out, r, slices)
    block_n, warps, per_program = expand_tile(n_out, seg.num_chunks, seg.block_m, num_sms(y.device))
    g = rescale if rescale is not None else scaling  # unused pointer when there is no rescale
    _expand_kernel[(seg.num_chunks, triton.cdiv(n_out, block_n * per_program))](
        part, b, y, scaling, g, seg.rows, seg.chunk_slot, seg.chunk_start, seg.chunk_len,
        n_out, slice_rank, off1, off2, per_program,
        stride_ps, stride_pm, b.stride(0), b.stride(1), y.stride(0), g.stride(0),
        HAS_RESCALE=rescale is not None, SPLITS=splits, NUM_SLICES=len(slices) if slices else 1,
        BLOCK_M=seg.block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(slice_rank)),
        PREC=dot_precision(y.dtype), FULL_R=slice_rank == max(16, triton.next_power_of_2(slice_rank)),
        BY_ROW=by_row, num_warps=warps,
    )
    return y


def lora_batched_triton(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
                        scaling: torch.Tensor, rescale: torch.Tensor | None = None,
                        slices: Sequence[int] | None = None) -> torch.Tensor:
    """In place on y [N, N_out]; returns y. See lora_batched.add_lora for the shapes and `slices`."""
    assert a.dtype == b.dtype == x.dtype, "adapter stacks must be in the activation dtype"
    return lora_expand_triton(y, lora_shrink_triton(x, seg, a), seg, b, scaling, rescale, slices)
