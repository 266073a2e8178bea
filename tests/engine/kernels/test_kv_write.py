"""Parity of the KV-cache write kernel with the torch reference."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_write import write_kv, write_kv_ref
from engine.kernels.testing import require_backend


def _case(device, dtype, num_tokens, hkv, d, page, num_blocks):
    k = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    v = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    slots = torch.randperm(num_blocks * page, device=device)[:num_tokens]
    slots[torch.rand(num_tokens, device=device) < 0.25] = -1  # padding tokens are skipped
    cache = torch.full((num_blocks, page, hkv, d), float("nan"), device=device, dtype=dtype)
    return k, v, slots, cache


def _check(writer, device, dtype, num_tokens, hkv, d, page, num_blocks, qkv_view=False):
    k, v, slots, cache = _case(device, dtype, num_tokens, hkv, d, page, num_blocks)
    if qkv_view:  # k and v as column slices of a fused qkv projection (non-contiguous rows)
        qkv = torch.randn(num_tokens, 3 * hkv * d, device=device).to(dtype)
        k = qkv[:, hkv * d : 2 * hkv * d].view(num_tokens, hkv, d)
        v = qkv[:, 2 * hkv * d :].view(num_tokens, hkv, d)
    kc, vc = cache.clone(), cache.clone()
    kr, vr = cache.clone(), cache.clone()
    writer(k, v, kc, vc, slots)
    write_kv_ref(k, v, kr, vr, slots)
    torch.testing.assert_close(kc, kr, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(vc, vr, equal_nan=True, rtol=0, atol=0)
    written = slots[slots >= 0]
    assert torch.isfinite(kc.view(-1, hkv, d)[written]).all()
    assert torch.isnan(kc.view(-1, hkv, d)[slots.new_ones(num_blocks * page, dtype=torch.bool).index_fill_(0, written, False)]).all()


def test_reference_writes_only_valid_slots():
    _check(write_kv_ref, "cpu", torch.float32, 9, 2, 8, 4, 6)


@pytest.mark.parametrize("qkv_view", [False, True])
def test_triton_cpu(qkv_view):
    from engine.kernels.kv_write_triton import write_kv_triton

    require_backend("cpu")
    _check(write_kv_triton, "cpu", torch.float16, 13, 2, 32, 16, 5, qkv_view)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [8, 32])
def test_dispatcher_gpu(hkv):
    require_backend("cuda")
    _check(write_kv, "cuda", torch.bfloat16, 3000, hkv, 128, 16, 400, qkv_view=True)
