"""Paged attention for the torch path off the GPU: decode sequences batched by context length.

Same contract as `paged_attention_ref` (engine/kernels/paged_attention.py), which loops over
sequences: a dozen small torch ops per sequence and layer, most of a CPU decode step. Here the
one-query (decode) sequences are sorted by their number of KV blocks and cut into groups of
similar length; each group is one gather per cache and two batched matmuls. Sequences with
several queries (prefill chunks) and groups of one still take the reference's per-sequence code.

What the speed depends on (2-core CPU, bf16 cache; benchmarks/bench_attention_cpu.py):
  - `index_select` on a [num_blocks, block elements] view gathers blocks about 5x faster than
    advanced indexing;
  - K is copied once, to fp32 in [G, Hkv, L, D] order (rows of D stay contiguous, so the copy is
    cheap), and the scores are q @ K^T with K^T a transposed view that BLAS reads in place;
    the other orientation (K @ q^T) runs several times slower;
  - V stays in the cache dtype and the probabilities are rounded to it for the value sum, as
    the Triton decode kernel does (p.to(v.dtype) before its dot; fp32 accumulation): an fp32
    value pass made the whole call about 3x slower;
  - groups are capped in size: one huge group (tens of MB of fp32 keys) ran 2x slower than the
    per-sequence loop at 2k-token contexts.
Scores and softmax are fp32. With an fp32 cache every step is fp32, as in the reference.
"""
from __future__ import annotations

import torch

from engine.kernels.paged_attention import attend_sequence

# A group's padded size (its longest sequence's blocks x its sequences) stays within PAD_BUDGET
# times the blocks its sequences own, and its fp32 keys within GROUP_ELEMENTS elements (cache-sized
# pieces: one big group runs several times slower at long contexts).
PAD_BUDGET = 1.25
GROUP_ELEMENTS = 1 << 20


def group_by_length(num_blocks: list[int], pad_budget: float | None = None,
                    max_padded: int | None = None) -> list[list[int]]:
    """Sequence indices in groups of similar length. Sorted by blocks, a group grows while
    (its longest x its size) <= pad_budget (default PAD_BUDGET) x (its blocks) and, given
    max_padded, <= max_padded."""
    pad_budget = PAD_BUDGET if pad_budget is None else pad_budget
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__)
    groups: list[list[int]] = []
    owned = 0
    for s in order:
        n = num_blocks[s]
        padded = n * (len(groups[-1]) + 1) if groups else 0
        if groups and padded <= pad_budget * (owned + n) and (max_padded is None or padded <= max_padded):
            groups[-1].append(s)
            owned += n
        else:
            groups.append([s])
            owned = n
    return groups


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """paged_attention_ref's result, with decode sequences batched (see the module docstring)."""
    out = torch.zeros_like(q)
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    alone, decode, decode_blocks = [], [], []  # alone: sequences that take the reference's code
    for s, kv_len in enumerate(ctx):
        q_len = cu[s + 1] - cu[s]
        if q_len <= 0 or kv_len <= 0:
            continue
        if q_len == 1:
            decode.append(s)
            decode_blocks.append(-(-kv_len // block_size))
        else:
            alone.append(s)
    num_heads_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    max_padded = max(1, GROUP_ELEMENTS // (block_size * num_heads_kv * head_dim))
    for group in group_by_length(decode_blocks, max_padded=max_padded):
        seqs = [decode[i] for i in group]
        if len(seqs) == 1:  # alone, the reference's few ops are cheaper than the gather
            alone.extend(seqs)
            continue
        _decode_group(q, k_cache, v_cache, block_tables, [cu[s] for s in seqs], seqs,
                      [ctx[s] for s in seqs], decode_blocks[group[-1]], scale, out)
    for s in alone:
        out[cu[s]:cu[s + 1]] = attend_sequence(q[cu[s]:cu[s + 1]], k_cache, v_cache, block_tables[s], ctx[s], scale, s)
    return out


def _decode_group(q, k_cache, v_cache, block_tables, rows, seqs, lens, n_blocks, scale, out) -> None:
    """One query per sequence; every sequence padded to n_blocks blocks, the padding masked."""
    num_cache_blocks, block_size, hkv, d = k_cache.shape
    g, hq = len(seqs), q.shape[1]
    length = n_blocks * block_size
    seq_idx = torch.tensor(seqs, device=q.device)
    row_idx = torch.tensor(rows, device=q.device)
    blocks = block_tables.index_select(0, seq_idx)[:, :n_blocks].reshape(-1).long()

    pad_rows = None
    if min(lens) < length:  # padded positions: their scores are masked, their values zeroed
        pad = torch.arange(length, device=q.device)[None, :] >= torch.tensor(lens, device=q.device)[:, None]
        pad_rows = pad.view(-1).nonzero().view(-1)

    def gather(cache: torch.Tensor, zero_pad: bool, dtype: torch.dtype) -> torch.Tensor:  # -> [G, Hkv, L, D]
        rows = cache.view(num_cache_blocks, -1).index_select(0, blocks).view(g * length, hkv * d)
        if zero_pad and pad_rows is not None:  # stale slots may hold inf or nan, and 0 * nan is nan
            rows.index_fill_(0, pad_rows, 0.0)
        return rows.view(g, length, hkv, d).transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)

    k, v = gather(k_cache, False, torch.float32), gather(v_cache, True, v_cache.dtype)
    qs = q.index_select(0, row_idx).float().view(g, hkv, hq // hkv, d)
    scores = torch.matmul(qs, k.transpose(-1, -2)).mul_(scale)  # [G, Hkv, Hq/Hkv, L]
    if pad_rows is not None:
        scores.masked_fill_(pad.view(g, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs.to(v.dtype), v)  # [G, Hkv, Hq/Hkv, D]
    out.index_copy_(0, row_idx, o.view(g, hq, d).to(out.dtype))
