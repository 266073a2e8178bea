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


def test_dispatcher_without_triton_on_cpu_matches_sdpa(monkeypatch):
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
    from engine.kernels.paged_decode_triton import DECODE_CONFIGS, work_bucket

    sms = 132  # up to two programs an SM take 128-token tiles, larger launches 64-token ones
    assert work_bucket(256, sms) == 0 and work_bucket(264, sms) == 0 and work_bucket(265, sms) == 1
    assert DECODE_CONFIGS[0]["BLOCK_N"] == 128 and DECODE_CONFIGS[1]["BLOCK_N"] == 64


def test_decode_split_count_rule():
    pytest.importorskip("triton")
    from engine.kernels.paged_decode_triton import MAX_SPLITS, MIN_SPLIT_TOKENS, choose_num_splits

    sms = 132
    # A launch with a program per SM already runs unsplit, however long the contexts.
    assert choose_num_splits(32, 8, 8192, sms) == 1 and choose_num_splits(17, 8, 32768, sms) == 1
    # Small launches split long contexts to reach ~4 programs an SM ...
    assert choose_num_splits(1, 8, 8192, sms) == min(-(-4 * sms // 8), 8192 // MIN_SPLIT_TOKENS, MAX_SPLITS)
    assert choose_num_splits(8, 8, 8192, sms) == -(-4 * sms // 64)
    # ... but never into pieces shorter than MIN_SPLIT_TOKENS.
    assert MIN_SPLIT_TOKENS == 128
    assert choose_num_splits(1, 8, 300, sms) == 3 and choose_num_splits(1, 8, 100, sms) == 1
