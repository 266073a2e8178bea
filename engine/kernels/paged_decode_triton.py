"""Triton paged attention for decode: one query token per sequence (flash-decoding), one launch.

One program serves every query head of one KV head (GQA: the G heads sharing a KV head form
the rows of a small matmul), so each K/V tile is read from memory once per step. When the
batch is too small to fill the GPU, each sequence's context is cut into splits handled by
separate programs of the same launch; the last of a (sequence, KV head) tile's programs to
finish merges their fp32 partial outputs by log-sum-exp, so no second kernel runs.

The host only bounds the split count (the launch grid, sized from max_context_len or, under
CUDA graphs, from the block table's capacity). Each program reads its sequence's context length
on the device and works out how many splits that context needs: programs past that count exit
at once, and a context that needs one split is written directly, without partials or atomics.
Layouts are those of paged_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET, LOG2E, dot_precision, num_sms, pick_configs
from engine.kernels.quant_split_triton import split_locks

# Splits are cut at multiples of this many tokens (the largest BLOCK_N below), so every
# tile size divides a split.
SPLIT_ALIGN = 128
_SPLIT_ALIGN = tl.constexpr(SPLIT_ALIGN)
# Host side: the launch's split count (an upper bound) never makes splits shorter than this. Measured
# on the H200 at batch 1, 2k context: 16 splits of 128 tokens ran in 8.7 us against 12.2 us for 8 of 256.
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64
# Device side: a context runs in cdiv(context, floor) splits at most (and never more than were
# launched). Each split past the first costs its partial stores, an atomic and the last arriver's
# reads of every partial; a longer floor keeps short contexts in one program with no merge at all.
# Measured on the H200 (benchmarks/sweep_decode_launch.py, 32 / 8 heads, head dim 64 and 128,
# contexts 256-8k): at batch 1 a 128-token floor is worst at 1.10-1.13x the best launch over all
# contexts (256: 1.4x slower than one program, 1k-8k faster), 256 at 1.18-1.19x; at batch 8 a
# 256-token floor is worst at 1.09-1.13x, 128 at 1.15-1.18x. The floor steps at FLOOR_PROGRAMS.
MIN_SPLIT_TOKENS_RT = 256
MIN_SPLIT_TOKENS_FEW = 128  # the floor for launches of fewer than FLOOR_PROGRAMS (sequence, KV head) pairs
FLOOR_PROGRAMS = 32
# Contexts up to this many tokens run in one program whatever the floor: at 256 tokens one program
# beat two 128-token splits and their merge (batch 1: 5.3 / 7.0 us against 6.0 / 7.7 at head dim
# 64 / 128), while at 1k the 128-token floor won (8.2 / 9.7 us against 9.7 / 11.5).
SINGLE_SPLIT_TOKENS = 256


def run_time_floor(num_seqs: int, num_kv_heads: int) -> int:
    """Tokens a split must at least hold at run time (see MIN_SPLIT_TOKENS_RT)."""
    return MIN_SPLIT_TOKENS_FEW if num_seqs * num_kv_heads < FLOOR_PROGRAMS else MIN_SPLIT_TOKENS_RT


# Launch configurations a sweep times (benchmarks/bench_kernels.py --sweep); the kernel itself runs
# the measured table below (the interpreter the first of these).
_CONFIGS: list[dict] = pick_configs([
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "num_warps": 2, "num_stages": 4},
])

# Measured winners by the launch's (sequence, KV head) pairs (work_bucket), from the H200 sweeps of
# benchmarks/NOTES.md: up to two an SM, 128-token tiles (batch 32 at 2k-8k: 69 / 248 us against
# 76 / 276 with 64; batch 1 and 8, split, at 256-8k: every top-ranked launch of
# sweep_decode_launch.py); beyond that, 64-token tiles (batch 64 at 512-8k: fastest of the five).
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
    out_ptr, part_out_ptr, part_lse_ptr, lock_ptr,
    scale_log2, min_split, single_max,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, SPLIT: tl.constexpr, S_PAD: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    launched = tl.num_programs(2)
    ctx = tl.load(context_lens_ptr + seq)
    # This context's own split count: at most one split per min_split tokens and per launched program,
    # split lengths rounded up to whole tiles, then the count that those lengths need. The active
    # splits tile [0, ctx) exactly (the last one ends at the context's end), so any launched count
    # (a stale one frozen in a CUDA graph, or 1) is correct; programs past the count exit here.
    # A padding sequence (context 0) gets one empty split, which writes zeros.
    ctx1 = tl.maximum(ctx, 1)
    want = tl.minimum(tl.maximum(tl.cdiv(ctx, min_split), 1), launched)
    want = tl.where(ctx <= single_max, 1, want)  # short contexts: one program, no merge
    split_len = tl.cdiv(tl.cdiv(ctx1, want), _SPLIT_ALIGN) * _SPLIT_ALIGN
    active = tl.cdiv(ctx1, split_len)
    if split >= active:
        return
    start = split * split_len
    end = tl.minimum(ctx, start + split_len)

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

    # An empty range (a padding sequence) leaves l == 0: emit zeros.
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]  # [G_PAD, D_PAD]
    if active == 1:  # this program owns the whole context and writes the output itself
        dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        if SPLIT:  # (always taken: one launched split means one active split)
            # Partial rows are (sequence, query head, split): a tile's heads are consecutive.
            row = (seq * tl.num_programs(1) * GROUP + heads) * launched + split  # [G_PAD]
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=gd_mask)
            tl.store(part_lse_ptr + row, m + tl.log2(l_safe), mask=g < GROUP)
            # Every thread's partial stores precede the arrival (barrier); the acq_rel atomic releases
            # them to, and acquires the others' for, the program that sees itself last.
            tl.debug_barrier()
            tile = seq * tl.num_programs(1) + kvh
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if arrived == active - 1:
                _merge_tile(part_out_ptr, part_lse_ptr, out_ptr, seq, kvh * GROUP, active, launched,
                            stride_ot, stride_oh, GROUP, HEAD_DIM, D_PAD, S_PAD)
                tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next call (or graph replay)


@triton.jit
def _merge_tile(part_out_ptr, part_lse_ptr, out_ptr, seq, head0, active, launched, stride_ot, stride_oh,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """Log-sum-exp merge of one tile's `active` partials into out, one query head at a time.

    The sums run over the split axis in a fixed order (a reduction over S_PAD lanes), whichever
    program arrived last: the output does not depend on arrival order. Loads bypass L1 (.cg):
    the other programs' partials were written by other SMs."""
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < active
    for h in range(GROUP):  # not unrolled: one [S_PAD, D_PAD] tile live at a time
        row0 = (seq * tl.num_programs(1) * GROUP + head0 + h) * launched
        lse = tl.load(part_lse_ptr + row0 + s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse - tl.max(lse, 0))  # [S_PAD]; every active split is non-empty, so the max is finite
        o = tl.load(part_out_ptr + (row0 + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0, cache_modifier=".cg")
        res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + seq * stride_ot + (head0 + h) * stride_oh + d, res.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, sm_count: int) -> int:
    """Splits per sequence to launch (an upper bound: each program trims it to its own context):
    none once the launch has a program for every SM, else enough for ~2 programs an SM, never
    splits shorter than MIN_SPLIT_TOKENS (one 128-token tile).

    Both rules are measured (benchmarks/NOTES.md): on an H200 at batch 32 and 64 (256 and 512
    programs), contexts 512 to 8k, one split ran as fast or faster than the 2-3 that aiming at four
    programs an SM gave, since the partials and the merge cost more than the extra parallelism; at
    batch 1 and 8 a launch sized for every context up to 8k (as a CUDA graph's is) did best with
    32 and 4-8 splits (benchmarks/sweep_decode_launch.py), i.e. about two programs an SM: the
    programs a short context leaves idle still take their turn on the SMs.
    """
    programs = num_seqs * num_kv_heads
    if programs >= sm_count:
        return 1
    want = triton.cdiv(2 * sm_count, max(programs, 1))
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
    min_split_tokens: int | None = None,
    single_split_tokens: int | None = None,
) -> torch.Tensor:
    """Decode attention, q [num_seqs, Hq, D] (one token each) -> out [num_seqs, Hq, D].

    max_context_len is a host-side estimate of the longest context, used only to size the launch
    (any value gives correct results); without it the block table's capacity is used.
    num_splits overrides the heuristic's launched split count (tests and benchmarks); each
    sequence still runs in at most cdiv(context, min_split_tokens) of them (default:
    run_time_floor), and in one if its context is at most single_split_tokens (default
    SINGLE_SPLIT_TOKENS; 0 turns that off). `out` is an optional
    preallocated output (every element is written). `config` ({"BLOCK_N", "num_warps",
    "num_stages"}) replaces the measured table's choice (benchmark sweeps).

    With more than one split launched, the kernel uses the per-device arrival counters of
    quant_split_triton.split_locks, which the split-K matmuls share: calls on one device must not
    run concurrently on different streams (a forward is one stream, and every launch leaves its
    counters at zero, so the kernels take turns with them safely).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    assert group * num_kv_heads == num_q_heads and k_cache.shape[-1] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.shape == v_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    min_split_tokens = min_split_tokens or run_time_floor(q.shape[0], k_cache.shape[2])
    assert min_split_tokens >= 1
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, num_sms(q.device))
    # No more programs than whole tiles of the longest context would fill (others could only exit).
    split_len = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(max(max_context_len, 1), split_len)
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
        # Shared with the split-K matmuls (see the docstring): each launch leaves them at zero.
        locks = split_locks(q.device, num_seqs * num_kv_heads)  # one counter per (sequence, KV head)
    else:
        part_out = part_lse = out  # unused
        locks = context_lens  # unused
    grid = (num_seqs, num_kv_heads, num_splits)
    if config is None:  # by the (sequence, KV head) pairs: split programs are short or idle (measured)
        config = decode_config(num_seqs * num_kv_heads, num_sms(q.device))
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse, locks,
        scale * LOG2E, min_split_tokens, SINGLE_SPLIT_TOKENS if single_split_tokens is None else single_split_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), PAGE=page, SPLIT=split, S_PAD=triton.next_power_of_2(num_splits),
        PREC=dot_precision(q.dtype), **config,
    )
    return out
