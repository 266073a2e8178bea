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


def _check(device, dtype, t, hq, hkv, d, page, num_blocks, tol, rms_cols=0):
    from engine.kernels.rope_triton import rope_and_write_kv_triton

    q, k, v, positions, cs, cache, slots = _case(device, dtype, t, hq, hkv, d, page, num_blocks)
    # The RMS source: rows of a residual stream of mixed scales (folded-norm models).
    src = None
    if rms_cols:
        src = (torch.randn(t, rms_cols, device=device) * torch.rand(t, 1, device=device) * 30).to(dtype)
    kc, vc, kr, vr = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    out = torch.full_like(q, float("nan"))
    rope_and_write_kv_triton(q, k, v, positions, cs, kc, vc, slots, out=out, rms_source=src, eps=1e-5)
    expected = rope_and_write_kv_ref(q, k, v, positions, cs, kr, vr, slots, rms_source=src, eps=1e-5)
    assert_close_rel(out.float(), expected.float(), tol)
    torch.testing.assert_close(kc.float(), kr.float(), equal_nan=True, rtol=2 * tol, atol=tol)
    if src is None:
        torch.testing.assert_close(vc, vr, equal_nan=True, rtol=0, atol=0)
    else:  # v * r: the kernel's and torch's fp32 rsqrt may differ in the last bit
        torch.testing.assert_close(vc.float(), vr.float(), equal_nan=True, rtol=2 * tol, atol=tol)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 32)])
def test_triton_cpu(hq, hkv, d):
    require_backend("cpu")
    _check("cpu", torch.float16, 9, hq, hkv, d, 8, 4, 2e-3)


def test_triton_cpu_fp32_odd_heads():
    require_backend("cpu")
    _check("cpu", torch.float32, 5, 7, 1, 16, 4, 3, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_cpu_rms_scale(dtype, tol):
    require_backend("cpu")
    _check("cpu", dtype, 7, 8, 2, 32, 8, 4, tol, rms_cols=80)


def test_rms_scale_reference_is_the_normalized_input():
    """q, k, v scaled by the source's RMS equal projections of the normalized source (the folding identity)."""
    t, d, hq, hkv, hd = 5, 48, 4, 2, 8
    x = torch.randn(t, d) * 7
    w = torch.randn((hq + 2 * hkv) * hd, d)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    qkv_raw, qkv_normed = x @ w.t(), (x * r) @ w.t()
    split = [hq * hd, hkv * hd, hkv * hd]
    q, k, v = (y.view(t, -1, hd) for y in qkv_raw.split(split, -1))
    qn, kn, vn = (y.view(t, -1, hd) for y in qkv_normed.split(split, -1))
    positions = torch.randint(0, 100, (t,))
    cs = build_cos_sin_cache(_inv_freq(hd), 128)
    slots = torch.arange(t)
    caches = [torch.zeros(4, 4, hkv, hd) for _ in range(4)]
    got = rope_and_write_kv_ref(q, k, v, positions, cs, caches[0], caches[1], slots, rms_source=x, eps=1e-6)
    want = rope_and_write_kv_ref(qn, kn, vn, positions, cs, caches[2], caches[3], slots)
    assert_close_rel(got, want, 1e-5)
    assert_close_rel(caches[0], caches[2], 1e-5)
    assert_close_rel(caches[1], caches[3], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32), (28, 4)])
def test_dispatcher_gpu(hq, hkv):
    require_backend("cuda")
    _check("cuda", torch.bfloat16, 2000, hq, hkv, 128, 16, 200, 1e-2)
    _check("cuda", torch.bfloat16, 300, hq, hkv, 128, 16, 200, 1e-2, rms_cols=4096)
    q, k, v, positions, cs, cache, slots = _case("cuda", torch.bfloat16, 64, hq, hkv, 128, 16, 8)
    out = rope_and_write_kv(q, k, v, positions, cs, cache.clone(), cache.clone(), slots)
    assert_close_rel(out.float(), apply_rope_ref(q, positions, cs).float(), 1e-2)
