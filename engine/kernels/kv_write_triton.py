"""Triton kernel scattering k and v rows into the paged cache (see kv_write.py for layouts)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    # A -1 slot (padding) turns every access off instead of branching.
    slots = tl.zeros([H_PAD, D_PAD], tl.int64) + slot
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM) & (slots >= 0)
    dst = (slots // PAGE) * stride_cb + (slots % PAGE) * stride_cs + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v [T, Hkv, D] into k_cache, v_cache [blocks, page, Hkv, D] at slot_mapping (in place)."""
    num_tokens, num_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.shape == v_cache.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    h_pad, d_pad = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=d_pad, PAGE=k_cache.shape[1],
        num_warps=4 if h_pad * d_pad >= 1024 else 1,
    )
