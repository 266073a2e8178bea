"""Split-K epilogue shared by the weight-only matmul kernels: one launch, deterministic.

Programs that share an output tile but own different K slices store fp32 partials
[splits, M, N]; each then bumps the tile's arrival counter, and the one that arrives last sums
the partials in split order (so the result does not depend on arrival order), adds the bias,
writes the output and resets the counter to zero for the next call. No second kernel and no
zero-fill launch are needed, which matters inside CUDA graphs where every launch costs ~2 us.
Calls that share a device must not run concurrently on different streams: they share the
counters (a decode step is one stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOCKS: dict[tuple[str, int | None], torch.Tensor] = {}
MIN_LOCKS = 1 << 16


def split_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-device int32 arrival counters (all zero between calls), at least `tiles` of them.

    Allocated once per device (call once before CUDA-graph capture, e.g. in a warm-up pass;
    a buffer first allocated during capture would come from the graph's private pool).
    """
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(MIN_LOCKS, triton.next_power_of_2(tiles)), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def split_scratch(out: torch.Tensor, split: int, tiles: int,
                  unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, arrival counters) of a launch over `tiles` output tiles of out [M, N], K split `split`
    ways: fp32 [split, M, N] and split_locks(); without a split both are placeholders (`out`, and
    `unused` for the counters), which the kernels never touch."""
    if split <= 1:
        return out, unused
    return torch.empty(split, *out.shape, device=out.device, dtype=torch.float32), split_locks(out.device, tiles)


@triton.jit
def _write_out(total, m, n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """out[m, n] = total (+ bias[n]) (+ out[m, n] with ACCUMULATE), rounded once to out's dtype."""
    mask = (m < M)[:, None] & (n < N)[None, :]
    dst = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :]
    if HAS_BIAS:
        total += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:  # each element is read and written by the one program that owns it
        total += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_rows(total, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k,
               SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_N] fp32 tile: the output (no split) or this program's partial.
    ACCUMULATE adds the output's current values (out += x W^T, e.g. a residual stream)."""
    if SPLIT:
        mask = (m < M)[:, None] & (n < N)[None, :]
        dst = part_ptr + (pid_k.to(tl.int64) * M + m)[:, None] * N + n[None, :]
        tl.store(dst, total, mask=mask)
    else:
        _write_out(total, m, n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS, ACCUMULATE)


@triton.jit
def split_fixup(lock_ptr, tile, part_ptr, bias_ptr, out_ptr, m, n, M, N, stride_om, HAS_BIAS: tl.constexpr,
                ACCUMULATE: tl.constexpr):
    """After store_rows(SPLIT=True): the tile's last program to arrive reduces and writes it."""
    splits = tl.num_programs(2)
    # Every thread's partial stores precede the arrival (barrier); the acq_rel atomic releases
    # them to, and acquires the others' for, the program that sees itself last.
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
    if arrived == splits - 1:
        mask = (m < M)[:, None] & (n < N)[None, :]
        src = part_ptr + m.to(tl.int64)[:, None] * N + n[None, :]
        total = tl.zeros([m.shape[0], n.shape[0]], tl.float32)
        plane = (M * N).to(tl.int64)  # partials of one split
        for s in range(0, splits):  # split order: the sum does not depend on arrival order
            total += tl.load(src + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
        _write_out(total, m, n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS, ACCUMULATE)
        tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next call
