"""Triton kernel: RoPE on q and k plus the paged KV write, one program per token (see rope.py).

With HAS_RMS the program also reads its token's row of the RMS source and scales q, k and v by
rsqrt(mean square + eps): through cos and sin for q and k, directly for v.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import pdl_launch, wait_for_inputs
from engine.kernels.rmsnorm_triton import row_rms_scale


@triton.jit
def _rotate(x_ptr, stride_h, cos, sin, h, j, mask, HALF: tl.constexpr):
    """Load both halves of rows h, rotate them by (cos, sin) [1, HALF] in fp32."""
    x1 = tl.load(x_ptr + h[:, None] * stride_h + j[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h[:, None] * stride_h + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, rms_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cs,
    stride_cb, stride_cp, stride_ch, stride_rms, rms_cols, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr, HAS_RMS: tl.constexpr, RMS_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    if HAS_RMS:
        r = row_rms_scale(rms_ptr + tok.to(tl.int64) * stride_rms, rms_cols, eps, RMS_BLOCK)
        cos = cos * r
        sin = sin * r

    hq = tl.arange(0, HQ_PAD)
    q_mask = (hq[:, None] < HQ) & (j[None, :] < HALF)
    o1, o2 = _rotate(q_ptr + tok * stride_qt, stride_qh, cos, sin, hq, j, q_mask, HALF)
    q_dst = q_out_ptr + tok * stride_ot + hq[:, None] * stride_oh + j[None, :]
    tl.store(q_dst, o1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, o2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    # Padding tokens (slot -1) still rotate q but write nothing to the cache.
    hk = tl.arange(0, HKV_PAD)
    slot = tl.zeros([HKV_PAD, HALF_PAD], tl.int64) + tl.load(slot_ptr + tok).to(tl.int64)
    kv_mask = (hk[:, None] < HKV) & (j[None, :] < HALF) & (slot >= 0)
    k1, k2 = _rotate(k_ptr + tok * stride_kt, stride_kh, cos, sin, hk, j, kv_mask, HALF)
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cp + hk[:, None] * stride_ch + j[None, :]
    cache_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst, k1.to(cache_ty), mask=kv_mask)
    tl.store(k_cache_ptr + dst + HALF, k2.to(cache_ty), mask=kv_mask)
    v_src = v_ptr + tok * stride_vt + hk[:, None] * stride_vh + j[None, :]
    v1 = tl.load(v_src, mask=kv_mask)
    v2 = tl.load(v_src + HALF, mask=kv_mask)
    if HAS_RMS:  # rounded once from fp32, as the reference's (v * r).to(dtype)
        v1 = (v1.to(tl.float32) * r).to(v_ptr.dtype.element_ty)
        v2 = (v2.to(tl.float32) * r).to(v_ptr.dtype.element_ty)
    tl.store(v_cache_ptr + dst, v1.to(cache_ty), mask=kv_mask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(cache_ty), mask=kv_mask)


def rope_and_write_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    out: torch.Tensor | None = None,
    rms_source: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Rotated q [T, Hq, D] (new, or `out`); rotated k and v written into the paged cache; with
    rms_source [T, d] all three are first scaled by its rows' rsqrt(mean square + eps)."""
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.shape == v_cache.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if num_tokens == 0:
        return out
    half = head_dim // 2
    src = q if rms_source is None else rms_source.reshape(num_tokens, -1)
    assert src.stride(-1) == 1
    _rope_write_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, out, k_cache, v_cache, slot_mapping, src,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), src.stride(0), src.shape[-1], eps,
        HQ=hq, HKV=hkv, HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), PAGE=k_cache.shape[1],
        HAS_RMS=rms_source is not None, RMS_BLOCK=triton.next_power_of_2(src.shape[-1]),
        num_warps=4, **pdl_launch(q.device),
    )
    return out
