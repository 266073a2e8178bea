"""The batched CPU decode attention (engine/kernels/paged_attention_cpu.py) against the reference."""
from __future__ import annotations

import math
import random

import pytest
import torch

import engine.kernels.paged_attention_cpu as cpu_attn
from engine.kernels.paged_attention import paged_attention, paged_attention_ref
from engine.kernels.testing import assert_close_rel, make_paged_batch


def _run_both(b, scale):
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, scale)
    return cpu_attn.paged_attention_cpu(*args), paged_attention_ref(*args)


def test_fp32_decode_and_prefill_mix_matches_the_reference():
    # Decode sequences of many lengths (several groups, one alone), prefill chunks between them,
    # a sequence with no query and one with an empty context; the cache's unused slots are NaN.
    ctx = [7, 1, 40, 33, 16, 17, 90, 9, 300, 31, 0, 12]
    q_lens = [1, 1, 5, 1, 1, 1, 1, 9, 1, 0, 0, 1]
    b = make_paged_batch(q_lens, ctx, 8, 2, 16, 4, torch.float32, "cpu")
    scale = 1 / math.sqrt(16)
    out, ref = _run_both(b, scale)
    assert_close_rel(out, ref, 1e-5)


def test_bf16_decode_stays_within_bf16_error_of_the_fp32_reference():
    torch.manual_seed(1)
    ctx = [int(x) for x in torch.randint(1, 200, (40,))]
    b = make_paged_batch([1] * len(ctx), ctx, 8, 4, 32, 16, torch.bfloat16, "cpu")
    scale = 1 / math.sqrt(32)
    out = cpu_attn.paged_attention_cpu(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens,
                                       b.cu_seqlens_q, scale)
    exact = paged_attention_ref(b.q.float(), b.k_cache.float(), b.v_cache.float(), b.block_tables,
                                b.context_lens, b.cu_seqlens_q, scale)
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, exact, 2e-2)


def test_stale_inf_in_padded_slots_does_not_leak(monkeypatch):
    # Two sequences batched together, the shorter padded to the longer's blocks: the slots past its
    # context (same block) and the table entries past its blocks hold inf, never read.
    b = make_paged_batch([1, 1], [5, 30], 4, 2, 8, 8, torch.float32, "cpu", poison=False)
    short_blocks = b.block_tables[0].long()
    b.k_cache[short_blocks[0], 5:] = float("inf")
    b.v_cache[short_blocks[0], 5:] = float("inf")
    b.block_tables[0, 1:] = b.block_tables[0, 0]  # its padding block is its own block, inf tail and all
    monkeypatch.setattr(cpu_attn, "PAD_BUDGET", 10.0)  # force one group
    out, ref = _run_both(b, 0.3)
    assert_close_rel(out, ref, 1e-5)


def test_small_group_cap_gives_the_same_result(monkeypatch):
    ctx = [int(x) for x in torch.randint(20, 120, (24,), generator=torch.Generator().manual_seed(3))]
    b = make_paged_batch([1] * len(ctx), ctx, 4, 2, 8, 4, torch.float32, "cpu")
    whole, ref = _run_both(b, 0.35)
    monkeypatch.setattr(cpu_attn, "GROUP_ELEMENTS", 4 * 2 * 8 * 40)  # 40 blocks at most a group
    split, _ = _run_both(b, 0.35)
    assert_close_rel(whole, ref, 1e-5)
    assert_close_rel(split, ref, 1e-5)


def test_padding_tokens_past_the_last_sequence_get_zeros():
    b = make_paged_batch([1, 1, 1], [3, 20, 21], 4, 2, 8, 4, torch.float32, "cpu")
    q = torch.cat([b.q, torch.randn(2, 4, 8)])  # two padding rows past cu_seqlens_q[-1]
    out = cpu_attn.paged_attention_cpu(q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, 0.3)
    assert torch.equal(out[3:], torch.zeros(2, 4, 8))


def test_too_many_queries_for_the_context_is_an_error():
    b = make_paged_batch([3], [2], 4, 2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sequence 0: 3 queries but context_len 2"):
        cpu_attn.paged_attention_cpu(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, 0.3)


def test_dispatcher_takes_the_batched_path_on_cpu(monkeypatch):
    calls = []
    real = cpu_attn.paged_attention_cpu
    monkeypatch.setattr(cpu_attn, "paged_attention_cpu", lambda *a: calls.append(1) or real(*a))
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 4, torch.float32, "cpu")
    out = paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, 0.3)
    assert calls == [1]
    assert_close_rel(out, paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens,
                                              b.cu_seqlens_q, 0.3), 1e-5)


def test_groups_cover_every_sequence_once_within_their_bounds():
    rng = random.Random(0)
    for _ in range(300):
        blocks = [rng.randint(1, 64) for _ in range(rng.randint(0, 40))]
        budget = rng.uniform(1.0, 3.0)
        cap = rng.choice([None, rng.randint(1, 200)])
        groups = cpu_attn.group_by_length(blocks, budget, cap)
        assert sorted(i for g in groups for i in g) == list(range(len(blocks)))
        for g in groups:
            lens = [blocks[i] for i in g]
            assert lens == sorted(lens)
            if len(g) > 1:
                padded = max(lens) * len(g)
                assert padded <= budget * sum(lens)
                assert cap is None or padded <= cap
