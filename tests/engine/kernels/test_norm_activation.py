"""Fused RMSNorm(+residual) and SwiGLU: references against the model's modules, Triton against references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import silu_and_mul, silu_and_mul_ref
from engine.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from engine.kernels.testing import assert_close_rel, require_backend
from engine.model import RMSNorm

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_rmsnorm_reference_matches_model_module():
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x, r = torch.randn(5, 48), torch.randn(5, 48)
    out, new_res = rmsnorm_ref(x, norm.weight.detach(), 1e-5, residual=r)
    assert_close_rel(new_res, x + r, 0)
    assert_close_rel(out, norm(x + r).detach(), 1e-6)
    out2, same = rmsnorm_ref(x, norm.weight.detach(), 1e-5)
    assert same is x
    assert_close_rel(out2, norm(x).detach(), 1e-6)


def test_silu_and_mul_reference_matches_swiglu():
    g, u = torch.randn(3, 4, 40), torch.randn(3, 4, 40)
    assert_close_rel(silu_and_mul_ref(torch.cat((g, u), -1)), F.silu(g) * u, 1e-6)


def _check_rmsnorm(device, dtype, rows, n, with_residual):
    from engine.kernels.rmsnorm_triton import rmsnorm_triton

    x = torch.randn(rows, n, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(n, device=device)).to(dtype)
    r = torch.randn(rows, n, device=device).to(dtype) if with_residual else None
    out, new_res = rmsnorm_triton(x, w, 1e-6, r)
    ref_out, ref_res = rmsnorm_ref(x, w, 1e-6, r)
    assert_close_rel(out.float(), ref_out.float(), TOL[dtype])
    assert_close_rel(new_res.float(), ref_res.float(), 0)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rmsnorm_triton_cpu(with_residual, dtype):
    require_backend("cpu")
    _check_rmsnorm("cpu", dtype, 7, 96, with_residual)


def test_silu_and_mul_triton_cpu():
    from engine.kernels.activation_triton import silu_and_mul_triton

    require_backend("cpu")
    for dtype in (torch.float16, torch.float32):
        x = 3 * torch.randn(2, 5, 2 * 72).to(dtype)
        assert_close_rel(silu_and_mul_triton(x).float(), silu_and_mul_ref(x).float(), TOL[dtype])
        src = (torch.randn(2, 5, 40) * torch.rand(2, 5, 1) * 20).to(dtype)
        assert_close_rel(silu_and_mul_triton(x, src, 1e-5).float(), silu_and_mul_ref(x, src, 1e-5).float(),
                         TOL[dtype])


def test_silu_and_mul_rms_reference_is_swiglu_of_the_normalized_input():
    x = torch.randn(6, 32) * 9
    w = torch.randn(2 * 24, 32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close_rel(silu_and_mul_ref(x @ w.t(), x, 1e-6), silu_and_mul_ref(normed @ w.t()), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2048, 4096, 5120])
def test_rmsnorm_gpu(n):
    require_backend("cuda")
    _check_rmsnorm("cuda", torch.bfloat16, 4099, n, True)
    _check_rmsnorm("cuda", torch.bfloat16, 3, n, False)
    x = torch.randn(64, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert_close_rel(rmsnorm(x, w, 1e-5)[0].float(), rmsnorm_ref(x, w, 1e-5)[0].float(), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [8192, 14336])
def test_silu_and_mul_gpu(inter):
    require_backend("cuda")
    x = 3 * torch.randn(300, 2 * inter, device="cuda", dtype=torch.bfloat16)
    assert_close_rel(silu_and_mul(x).float(), silu_and_mul_ref(x).float(), TOL[torch.bfloat16])
    src = 40 * torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    assert_close_rel(silu_and_mul(x, src, 1e-5).float(), silu_and_mul_ref(x, src, 1e-5).float(), TOL[torch.bfloat16])
