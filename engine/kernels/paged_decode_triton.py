"""Triton paged attention for decode: one query token per sequence (flash-decoding).

One program serves every query head of one KV head (GQA: the G heads sharing a KV head form
the rows of a small matmul), so each K/V tile is read from memory once per step. When the
batch is too small to fill the GPU, each sequence's context is cut into splits handled by
separate programs; a second kernel merges their partial outputs by log-sum-exp.
Layouts are those of paged_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import (
    INTERPRET, LOG2E, dot_precision, num_sms, pdl_launch, pick_configs, wait_for_inputs,
)

# Splits are cut at multiples of this many tokens (the largest BLOCK_N below), so every
# tile size divides a split.
SPLIT_ALIGN = 128
# Splits are at least this long. Measured on the H200 at batch 1, 2k context: 16 splits of 128
# tokens ran in 8.7 us against 12.2 us for 8 of 256 (the merge is cheap next to a longer serial scan).
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64

# Launch configurations a sweep times (benchmarks/bench_kernels.py --sweep); the kernel itself runs
# the measured table below (the interpreter the first of these).
_CONFIGS: list[dict] = pick_configs([
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4},
])

# Measured winners by launch size (work_bucket), from the H200 sweep of benchmarks/NOTES.md: up to
# two programs an SM, 128-token tiles (batch 32 at 2k-8k: 69 / 248 us against 76 / 276 with 64;
# batch 1 at 2k in 16 splits: 8.7 us against 9.5); beyond that, 64-token tiles (batch 64 at
# 512-8k, batch 8 at 8k in 9 splits, batch 1 at 8k in 64 splits: fastest of the five configs).
# The autotuner this replaces was keyed without the context length and tuned on a warm-up's short
# contexts; it kept configurations up to 25% slower for long ones.
DECODE_CONFIGS: dict[int, dict] = {
    0: {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},  # at most two programs an SM
    1: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},  # more
}


def work_bucket(programs: int, sm_count: int) -> int:
    """Coarse size of a launch: at most two programs an SM (0), more (1)."""
    return 0 if programs <= 2 * sm_count else 1


def decode_config(programs: int, sm_count: int) -> dict:
    """The launch configuration for a decode launch of `programs` programs (the interpreter takes
    the sweep list's first, as elsewhere)."""
    return _CONFIGS[0] if INTERPRET else DECODE_CONFIGS[work_bucket(programs, sm_count)]


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, split_len,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    start = split * split_len
    # The last split runs to the context's end, so a stale max_context_len (say, one frozen in a
    # CUDA graph) only costs balance, never correctness.
    end = tl.where(split == tl.num_programs(2) - 1, ctx, tl.minimum(ctx, start + split_len))

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    gd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        phys = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = phys * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch  # [BLOCK_N]
        kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [G_PAD, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new

    # Empty ranges (padding sequences, splits past the context) leave l == 0: emit zeros.
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        num_splits = tl.num_programs(2)
        row = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [G_PAD]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=gd_mask)
        lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)
    else:
        dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(part_lse_ptr + row0 + s, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits weigh 0
    mask = (s[:, None] < num_splits) & (d[None, :] < HEAD_DIM)
    o = tl.load(part_out_ptr + (row0 + s[:, None]) * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, sm_count: int) -> int:
    """Splits per sequence: none once the launch has a program for every SM, else enough for ~4
    programs an SM, never splits shorter than MIN_SPLIT_TOKENS (one 128-token tile).

    The first rule is measured (benchmarks/NOTES.md): on an H200 at batch 32 and 64 (256 and 512
    programs), contexts 512 to 8k, one split ran as fast or faster than the 2-3 that aiming at four
    programs an SM gave, since the partials and the merge launch cost more than the extra parallelism.
    """
    programs = num_seqs * num_kv_heads
    if programs >= sm_count:
        return 1
    want = triton.cdiv(4 * sm_count, max(programs, 1))
    by_len = triton.cdiv(max_context_len, MIN_SPLIT_TOKENS)
    return max(1, min(want, by_len, MAX_SPLITS))


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Decode attention, q [num_seqs, Hq, D] (one token each) -> out [num_seqs, Hq, D].

    max_context_len is a host-side estimate of the longest context, used only to size the splits
    (any value gives correct results); without it the block table's capacity is used.
    num_splits overrides the heuristic (tests and benchmarks); `out` is an optional preallocated
    output (every element is written). `config` ({"BLOCK_N", "num_warps", "num_stages"})
    replaces the measured table's choice (benchmark sweeps).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    assert group * num_kv_heads == num_q_heads and k_cache.shape[-1] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.shape == v_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, num_sms(q.device))
    split_len = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(max(max_context_len, 1), split_len)
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # unused
    d_pad = triton.next_power_of_2(head_dim)
    grid = (num_seqs, num_kv_heads, num_splits)
    if config is None:
        config = decode_config(num_seqs * num_kv_heads * num_splits, num_sms(q.device))
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse,
        scale * LOG2E, split_len if split else 2**30,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=page, SPLIT=split, PREC=dot_precision(q.dtype), **config, **pdl_launch(q.device),
    )
    if split:
        _merge_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(num_splits),
            num_warps=4 if num_splits * d_pad >= 2048 else 2, **pdl_launch(q.device),
        )
    return out
