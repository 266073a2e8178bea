"""RoPE + paged KV write: reference against the model's own rotary code, Triton against the reference."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.rope import apply_rope_ref, build_cos_sin_cache, rope_and_write_kv, rope_and_write_kv_ref
from engine.kernels.testing import assert_close_rel, require_backend
from engine.model import apply_rope, rope_cos_sin


def _inv_freq(d, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d).float()


def test_reference_matches_model_rope():
    d, t = 32, 11
    x = torch.randn(t, 3, d)
    positions = torch.randint(0, 500, (t,))
    inv = _inv_freq(d)
    cos, sin = rope_cos_sin(inv, positions, torch.float32)  # [T, 1, D]
    expected = apply_rope(x, cos, sin)
    assert_close_rel(apply_rope_ref(x, positions, build_cos_sin_cache(inv, 512)), expected, 1e-5)


def _case(device, dtype, t, hq, hkv, d, page, num_blocks):
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device).to(dtype)  # k, v as views of a fused projection
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    positions = torch.randint(0, 4096, (t,), device=device)
    slots = torch.randperm(num_blocks * page, device=device)[:t]
    slots[torch.rand(t, device=device) < 0.2] = -1
    cache = torch.full((num_blocks, page, hkv, d), float("nan"), device=device, dtype=dtype)
    cs = build_cos_sin_cache(_inv_freq(d).to(device), 4096)
    return q, k, v, positions, cs, cache, slots


def _check(device, dtype, t, hq, hkv, d, page, num_blocks, tol):
    from engine.kernels.rope_triton import rope_and_write_kv_triton

    q, k, v, positions, cs, cache, slots = _case(device, dtype, t, hq, hkv, d, page, num_blocks)
    kc, vc, kr, vr = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    out = torch.full_like(q, float("nan"))
    rope_and_write_kv_triton(q, k, v, positions, cs, kc, vc, slots, out=out)
    expected = rope_and_write_kv_ref(q, k, v, positions, cs, kr, vr, slots)
    assert_close_rel(out.float(), expected.float(), tol)
    torch.testing.assert_close(kc.float(), kr.float(), equal_nan=True, rtol=2 * tol, atol=tol)
    torch.testing.assert_close(vc, vr, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 32)])
def test_triton_cpu(hq, hkv, d):
    require_backend("cpu")
    _check("cpu", torch.float16, 9, hq, hkv, d, 8, 4, 2e-3)


def test_triton_cpu_fp32_odd_heads():
    require_backend("cpu")
    _check("cpu", torch.float32, 5, 7, 1, 16, 4, 3, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32), (28, 4)])
def test_dispatcher_gpu(hq, hkv):
    require_backend("cuda")
    _check("cuda", torch.bfloat16, 2000, hq, hkv, 128, 16, 200, 1e-2)
    q, k, v, positions, cs, cache, slots = _case("cuda", torch.bfloat16, 64, hq, hkv, 128, 16, 8)
    out = rope_and_write_kv(q, k, v, positions, cs, cache.clone(), cache.clone(), slots)
    assert_close_rel(out.float(), apply_rope_ref(q, positions, cs).float(), 1e-2)
