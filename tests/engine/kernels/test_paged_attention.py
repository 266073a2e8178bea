"""Parity of the paged attention kernels (decode and varlen prefill) with the torch reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.paged_attention import paged_attention, paged_attention_ref
from engine.kernels.testing import assert_close_rel, make_paged_batch, require_backend

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _sdpa_oracle(b, scale):
    """Attention per sequence on its contiguous K/V with torch SDPA (independent of the paged code)."""
    outs = []
    hq, hkv = b.q.shape[1], b.keys[0].shape[1] if b.keys else 1
    cu = b.cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(zip(b.keys, b.values)):
        q = b.q[cu[s] : cu[s + 1]].double()
        q_len, ctx = q.shape[0], k.shape[0]
        kk = k.double().repeat_interleave(hq // hkv, 1)
        vv = v.double().repeat_interleave(hq // hkv, 1)
        visible = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                           attn_mask=visible, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def test_reference_matches_sdpa_on_contiguous_kv():
    b = make_paged_batch([3, 1, 9, 16], [7, 1, 20, 16], 8, 2, 16, 4, torch.float32, "cpu")
    scale = 1 / math.sqrt(16)
    out = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, scale)
    assert_close_rel(out, _sdpa_oracle(b, scale), 1e-5)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("EMBER_DISABLE_TRITON", "1")
    b = make_paged_batch([1, 1], [5, 9], 4, 2, 16, 4, torch.float32, "cpu")
    out = paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, 0.3)
    assert_close_rel(out, _sdpa_oracle(b, 0.3), 1e-5)


def _decode(device, dtype, hq, hkv, d, page, ctx_lens, num_splits):
    from engine.kernels.paged_decode_triton import paged_decode_attention_triton

    require_backend(device)
    b = _batch(device, dtype, [1] * len(ctx_lens), ctx_lens, hq, hkv, d, page)
    scale = 1 / math.sqrt(d)
    out = torch.full_like(b.q, float("nan"))
    paged_decode_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale,
                                  num_splits=num_splits, out=out)
    return out, b, scale


def _batch(device, dtype, q_lens, ctx_lens, hq, hkv, d, page):
    return make_paged_batch(q_lens, ctx_lens, hq, hkv, d, page, dtype, device)


def _expected(b, scale):
    ref = paged_attention_ref(b.q.float(), b.k_cache.float(), b.v_cache.float(), b.block_tables, b.context_lens,
                              b.cu_seqlens_q, scale)
    return ref


@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_cpu(hq, hkv, num_splits):
    out, b, scale = _decode("cpu", torch.float16, hq, hkv, 64, 16, [37, 1, 200], num_splits)
    assert_close_rel(out.float(), _expected(b, scale), TOL[torch.float16])


def test_decode_cpu_fp32_group7_and_padding_sequence():
    """Non power-of-two group (Qwen2-style 7:1) and an empty padding sequence (context 0 -> zeros)."""
    out, b, scale = _decode("cpu", torch.float32, 7, 1, 32, 8, [50, 0, 9], None)
    assert_close_rel(out, _expected(b, scale), TOL[torch.float32])
    assert (out[1] == 0).all()


def test_decode_cpu_stale_context_hint_is_still_exact():
    """A max_context_len below the real contexts (as a captured CUDA graph may hold) changes only the split."""
    from engine.kernels.paged_decode_triton import paged_decode_attention_triton

    require_backend("cpu")
    b = _batch("cpu", torch.float16, [1, 1], [300, 90], 8, 2, 32, 16)
    out = torch.full_like(b.q, float("nan"))
    paged_decode_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.2,
                                  max_context_len=200, num_splits=2, out=out)
    assert_close_rel(out.float(), _expected(b, 0.2), TOL[torch.float16])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_explicit_config_bypasses_autotune(device):
    """The config a benchmark sweep passes (tile size, warps, stages) computes the same attention."""
    from engine.kernels.paged_decode_triton import paged_decode_attention_triton

    require_backend(device)
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    b = _batch(device, dtype, [1, 1, 1], [130, 7, 64], 8, 2, 64, 16)
    for cfg, splits in (({"BLOCK_N": 32, "num_warps": 2, "num_stages": 2}, 1),
                        ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, 2)):
        out = torch.full_like(b.q, float("nan"))
        paged_decode_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.3,
                                      num_splits=splits, out=out, config=cfg)
        assert_close_rel(out.float(), _expected(b, 0.3), TOL[dtype])


def _decode_into(b, scale, **kw):
    from engine.kernels.paged_decode_triton import paged_decode_attention_triton

    out = torch.full_like(b.q, float("nan"))  # poisoned: a row the kernel never writes shows up
    return paged_decode_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale,
                                         out=out, **kw)


def _counters_are_zero(device):
    from engine.kernels.quant_split_triton import split_locks

    return int(split_locks(torch.device(device), 1).abs().sum()) == 0


# Contexts giving one active split (0: padding, 1, 200: up to SINGLE_SPLIT_TOKENS), three (300) and
# nine (1100) at the 128-token run-time floor of small launches, all in one batch.
MIXED_CTX = [1, 0, 200, 300, 1100]


@pytest.mark.parametrize("num_splits,max_context_len", [(1, None), (3, None), (64, 8192)])
def test_decode_cpu_run_time_split_count_mixed_contexts(num_splits, max_context_len):
    """Each sequence runs in as many splits as its own context needs, capped by the launch; a launch
    sized for a large capacity (as under CUDA graphs) gives the same attention."""
    from engine.kernels.paged_decode_triton import run_time_floor

    require_backend("cpu")
    assert run_time_floor(len(MIXED_CTX), 2) == 128  # MIXED_CTX is chosen for it
    b = _batch("cpu", torch.float16, [1] * len(MIXED_CTX), MIXED_CTX, 8, 2, 32, 16)
    out = _decode_into(b, 0.25, num_splits=num_splits, max_context_len=max_context_len)
    assert_close_rel(out.float(), _expected(b, 0.25), TOL[torch.float16])
    assert (out[1] == 0).all()
    assert _counters_are_zero("cpu")


def test_decode_cpu_fp32_many_short_splits():
    """min_split_tokens=1 cuts every context into 128-token splits (up to 7 here, group 4, fp32)."""
    require_backend("cpu")
    b = _batch("cpu", torch.float32, [1] * 4, [129, 900, 5, 256], 8, 2, 16, 16)
    out = _decode_into(b, 0.3, num_splits=16, max_context_len=2048, min_split_tokens=1, single_split_tokens=0)
    assert_close_rel(out, _expected(b, 0.3), TOL[torch.float32])
    assert _counters_are_zero("cpu")


def test_decode_cpu_launched_splits_beyond_need_change_no_bit():
    """The split count comes from each context, not from the launch: a launch of 1, 2 or 32 splits
    computes the same bits for contexts that need one split (<= 256 at a 256-token floor) or two (300)."""
    require_backend("cpu")
    b = _batch("cpu", torch.float16, [1, 1, 1], [256, 17, 300], 4, 2, 32, 16)
    one = _decode_into(b, 0.2, num_splits=1, min_split_tokens=256)
    many = _decode_into(b, 0.2, num_splits=32, max_context_len=4096, min_split_tokens=256)
    assert torch.equal(one[:2], many[:2])
    two = _decode_into(b, 0.2, num_splits=2, max_context_len=512, min_split_tokens=256)
    assert torch.equal(two, many)
    assert_close_rel(many.float(), _expected(b, 0.2), TOL[torch.float16])


def test_decode_cpu_short_contexts_run_in_one_program():
    """Contexts up to SINGLE_SPLIT_TOKENS run unsplit under any launch and floor: the same bits as a
    one-split launch; longer ones split at the floor."""
    from engine.kernels.paged_decode_triton import SINGLE_SPLIT_TOKENS

    require_backend("cpu")
    assert SINGLE_SPLIT_TOKENS == 256
    b = _batch("cpu", torch.float16, [1, 1], [256, 140], 4, 2, 32, 16)
    one = _decode_into(b, 0.2, num_splits=1)
    many = _decode_into(b, 0.2, num_splits=32, max_context_len=4096, min_split_tokens=128)
    assert torch.equal(one, many)
    split = _decode_into(b, 0.2, num_splits=32, max_context_len=4096, min_split_tokens=128, single_split_tokens=0)
    assert_close_rel(split.float(), _expected(b, 0.2), TOL[torch.float16])


def test_decode_cpu_consecutive_calls_reset_counters_and_repeat_bits():
    """The last arriver resets its tile's counter: a second and third call on the same counters
    (another batch, then the first again) are right, and the repeat is bit-identical."""
    require_backend("cpu")
    first = _batch("cpu", torch.float16, [1, 1], [700, 260], 8, 2, 32, 16)
    second = _batch("cpu", torch.float16, [1, 1, 1], [513, 1, 1000], 8, 2, 32, 16)
    a = _decode_into(first, 0.2, num_splits=8, max_context_len=1024)
    b = _decode_into(second, 0.2, num_splits=8, max_context_len=1024)
    again = _decode_into(first, 0.2, num_splits=8, max_context_len=1024)
    assert_close_rel(a.float(), _expected(first, 0.2), TOL[torch.float16])
    assert_close_rel(b.float(), _expected(second, 0.2), TOL[torch.float16])
    assert torch.equal(a, again)
    assert _counters_are_zero("cpu")


def test_prefill_cpu_chunked_varlen():
    """Full prompts, a chunk continuing a cached prefix, and decode rows mixed in one batch."""
    from engine.kernels.paged_prefill_triton import paged_prefill_attention_triton

    require_backend("cpu")
    for hq, hkv in [(2, 2), (8, 2)]:
        q_lens, ctx_lens = [20, 1, 33, 7], [20, 45, 70, 7]
        b = _batch("cpu", torch.float16, q_lens, ctx_lens, hq, hkv, 32, 16)
        scale = 1 / math.sqrt(32)
        out = torch.full_like(b.q, float("nan"))
        paged_prefill_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens,
                                       b.cu_seqlens_q, scale, out=out)
        assert_close_rel(out.float(), _expected(b, scale), TOL[torch.float16])


def test_prefill_cpu_fp32_against_sdpa():
    from engine.kernels.paged_prefill_triton import paged_prefill_attention_triton

    require_backend("cpu")
    b = _batch("cpu", torch.float32, [40, 3], [40, 90], 4, 1, 16, 8)
    out = torch.full_like(b.q, float("nan"))
    paged_prefill_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens,
                                   b.cu_seqlens_q, 0.2, max_seqlen_q=40, out=out)
    assert_close_rel(out, _sdpa_oracle(b, 0.2).float(), TOL[torch.float32])


# ---- GPU, real shapes, bf16 ----

@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_gpu(hq, hkv, num_splits):
    ctx = torch.randint(1, 4000, (24,)).tolist() + [1, 4096, 17]
    out, b, scale = _decode("cuda", torch.bfloat16, hq, hkv, 128, 16, ctx, num_splits)
    assert_close_rel(out.float(), _expected(b, scale), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_decode_gpu_run_time_splits_and_deterministic_merge(d):
    """32 query / 8 KV heads, bf16, contexts 0..8k mixed, launched splits 1..64 (64 as a graph sized
    for an 8k capacity would launch): parity, counters back at zero, and bit-identical repeats
    (programs arrive in a different order on every call; the merge order must not follow it)."""
    require_backend("cuda")
    ctx = torch.randint(1, 8193, (20,)).tolist() + [1, 0, 255, 256, 257, 513, 8192]
    b = _batch("cuda", torch.bfloat16, [1] * len(ctx), ctx, 32, 8, d, 16)
    want = _expected(b, d**-0.5)
    for num_splits, hint in [(1, None), (2, None), (7, None), (64, 8192), (None, None), (None, 8192)]:
        out = _decode_into(b, d**-0.5, num_splits=num_splits, max_context_len=hint)
        assert_close_rel(out.float(), want, TOL[torch.bfloat16])
        assert (out[len(ctx) - 6] == 0).all()  # the padding sequence
        for _ in range(3):
            assert torch.equal(_decode_into(b, d**-0.5, num_splits=num_splits, max_context_len=hint), out)
    assert _counters_are_zero("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8), (28, 4)])
def test_prefill_gpu(hq, hkv):
    from engine.kernels.paged_prefill_triton import paged_prefill_attention_triton

    require_backend("cuda")
    q_lens, ctx_lens = [512, 1, 1, 300, 1000, 64], [512, 800, 33, 1900, 1000, 2100]
    b = _batch("cuda", torch.bfloat16, q_lens, ctx_lens, hq, hkv, 128, 16)
    out = torch.full_like(b.q, float("nan"))
    paged_prefill_attention_triton(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens,
                                   b.cu_seqlens_q, 128**-0.5, out=out)
    assert_close_rel(out.float(), _expected(b, 128**-0.5), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_dispatcher_gpu_decode_and_mixed():
    require_backend("cuda")
    for q_lens, ctx in [([1] * 5, [3, 100, 2000, 1, 64]), ([1, 7, 1], [90, 7, 300])]:
        b = _batch("cuda", torch.float16, q_lens, ctx, 16, 4, 64, 16)
        out = paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, b.cu_seqlens_q, 0.125)
        assert_close_rel(out.float(), _expected(b, 0.125), TOL[torch.float16])


def test_decode_launch_config_follows_the_launch_size():
    pytest.importorskip("triton")
    from engine.kernels.paged_decode_triton import DECODE_CONFIGS, run_time_floor, work_bucket

    sms = 132  # up to two (sequence, KV head) pairs an SM take 128-token tiles, larger launches 64-token ones
    assert work_bucket(256, sms) == 0 and work_bucket(264, sms) == 0 and work_bucket(265, sms) == 1
    assert DECODE_CONFIGS[0]["BLOCK_N"] == 128 and DECODE_CONFIGS[1]["BLOCK_N"] == 64
    # Launches of few pairs split contexts into 128-token pieces at run time, larger ones into 256.
    assert run_time_floor(1, 8) == run_time_floor(3, 8) == 128 and run_time_floor(4, 8) == run_time_floor(8, 8) == 256


def test_decode_split_count_rule():
    pytest.importorskip("triton")
    from engine.kernels.paged_decode_triton import MAX_SPLITS, MIN_SPLIT_TOKENS, choose_num_splits

    sms = 132
    # A launch with a program per SM already runs unsplit, however long the contexts.
    assert choose_num_splits(32, 8, 8192, sms) == 1 and choose_num_splits(17, 8, 32768, sms) == 1
    # Small launches split long contexts to reach ~2 programs an SM ...
    assert choose_num_splits(1, 8, 8192, sms) == min(-(-2 * sms // 8), 8192 // MIN_SPLIT_TOKENS, MAX_SPLITS) == 33
    assert choose_num_splits(8, 8, 8192, sms) == -(-2 * sms // 64) == 5
    # ... but never into pieces shorter than MIN_SPLIT_TOKENS.
    assert MIN_SPLIT_TOKENS == 128
    assert choose_num_splits(1, 8, 300, sms) == 3 and choose_num_splits(1, 8, 100, sms) == 1
