"""Attention over a paged KV cache, for decode and (chunked) prefill alike.

Layouts (shared with the model runner):
  q             [num_tokens, Hq, D]   queries of all sequences, flat over tokens
  k_cache/v_cache [num_blocks, block_size, Hkv, D]
  block_tables  int32 [num_seqs, max_blocks_per_seq]  logical block -> physical block
  context_lens  int32 [num_seqs]  KV length of each sequence INCLUDING this step's tokens
  cu_seqlens_q  int32 [num_seqs + 1]  sequence s owns queries cu[s]:cu[s+1]

Causality: query j of a sequence with q_len queries sits at position context_len - q_len + j and
sees KV positions up to and including that one. GQA: query head h reads KV head h // (Hq // Hkv).
Tokens past cu_seqlens_q[-1] (padding) get zeros.
"""
from __future__ import annotations

import torch

from engine.kernels._dispatch import use_triton


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure-torch paged attention (gather the blocks, masked matmul, fp32 softmax)."""
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    for s in range(len(ctx)):
        q0, q1, kv_len = cu[s], cu[s + 1], ctx[s]
        if q1 - q0 <= 0 or kv_len <= 0:
            continue
        out[q0:q1] = attend_sequence(q[q0:q1], k_cache, v_cache, block_tables[s], kv_len, scale, s)
    return out


def attend_sequence(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_row: torch.Tensor,
    kv_len: int,
    scale: float,
    seq: int = 0,
) -> torch.Tensor:
    """One sequence's queries q [q_len, Hq, D] (the last q_len positions of its kv_len) -> [q_len, Hq, D]."""
    q_len, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if q_len > kv_len:
        raise ValueError(f"sequence {seq}: {q_len} queries but context_len {kv_len}")
    n_blocks = -(-kv_len // block_size)
    blocks = block_row[:n_blocks].long()
    k = k_cache[blocks].reshape(n_blocks * block_size, hkv, d)[:kv_len].float()  # [L, Hkv, D]
    v = v_cache[blocks].reshape(n_blocks * block_size, hkv, d)[:kv_len].float()
    qs = q.float().view(q_len, hkv, group, d)
    scores = torch.einsum("qhgd,khd->hgqk", qs, k) * scale  # [Hkv, G, q_len, L]
    if q_len > 1:  # one query (decode) sees every key: no mask to build
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]  # [q_len, L]
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("hgqk,khd->qhgd", probs, v)
    return o.reshape(q_len, hq, d).to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    max_seqlen_q: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Paged attention: Triton on CUDA tensors; on the CPU the torch path of paged_attention_cpu.py
    (decode sequences batched by length), the torch reference elsewhere.

    Every sequence in the batch must own at least one query token; a batch with as many tokens
    as sequences is then pure decode and takes the split-K decode kernel. The optional host-side
    hints avoid a device sync: max_seqlen_q (longest query run) sizes the prefill grid,
    max_context_len (an upper bound on context_lens) sizes the decode splits; leave
    max_context_len None under CUDA graphs (the block table's capacity is used instead).
    """
    if not use_triton(q, k_cache):
        if q.device.type == "cpu":
            from engine.kernels.paged_attention_cpu import paged_attention_cpu

            return paged_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)
    if q.shape[0] == context_lens.shape[0]:
        from engine.kernels.paged_decode_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=max_context_len
        )
    from engine.kernels.paged_prefill_triton import paged_prefill_attention_triton

    return paged_prefill_attention_triton(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, max_seqlen_q=max_seqlen_q
    )
