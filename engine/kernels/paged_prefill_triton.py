"""Triton paged attention for variable-length causal queries (prefill and chunked prefill).

Each program takes a block of query tokens of one sequence and all G query heads of one KV
head: its BLOCK_M rows are (token, head) pairs, row r being token r // G and head r % G, so a
K/V tile is read once for the G heads that share it. Online softmax over K/V tiles gathered
through the block table; keys stop at the block's last query position (causal).
Layouts are those of paged_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import LOG2E, dot_precision, pick_configs

_CONFIGS = pick_configs([
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
])


@triton.autotune(configs=_CONFIGS, key=["HEAD_DIM", "GROUP", "PAGE"])
@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per program
    qb = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # tokens already in the cache before this chunk

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    tok = qb * TOKENS + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = (r < TOKENS * GROUP) & (tok < q_len)
    rd_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rd_mask, other=0.0)
    q_pos = prefix + tok  # [BLOCK_M] absolute position of each row's token

    # Keys up to the last query of this block; programs past the sequence's queries do nothing.
    last_tok = tl.minimum(q_len, (qb + 1) * TOKENS)
    kv_end = tl.where(qb * TOKENS < q_len, prefix + last_tok, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < kv_end
        phys = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = phys * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
        kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
        # Key 0 is visible to every row, so the first tile makes every row's max finite.
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    dst = out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=rd_mask)


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache, q [T, Hq, D] -> out [T, Hq, D].

    max_seqlen_q (host int, the longest query run) sizes the grid; without it it is read from
    cu_seqlens_q, which waits for the GPU. Rows past cu_seqlens_q[-1] are zeros, or left
    untouched in a preallocated `out`.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    assert group * num_kv_heads == num_q_heads and k_cache.shape[-1] == head_dim
    assert group <= 64, "BLOCK_M must hold at least one token's heads"
    assert k_cache.stride() == v_cache.stride() and k_cache.shape == v_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = torch.zeros_like(q) if out is None else out
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"] // group), num_seqs, num_kv_heads)

    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), PAGE=page,
        PREC=dot_precision(q.dtype),
    )
    return out
