"""Split-K dense GEMV for decode-sized M: parity with F.linear, one-launch split reduction, GemvLinear."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import dense_gemv as dg
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _case(m, n, k, dtype, device, bias):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _check(m, n, k, dtype, device, bias, splits):
    from engine.kernels.dense_gemv_triton import dense_gemv_triton

    x, w, b = _case(m, n, k, dtype, device, bias)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    for _ in range(2):  # twice: the split counters must be back at zero after a call
        got = dense_gemv_triton(x, w, b, splits=splits)
        assert got.dtype == dtype and got.shape == (m, n)
        assert_close_rel(got.float(), want, TOL[dtype])


# Interpreter: fp32 and fp16 (its bf16 dot is not exact), ragged N and K, 1 and several splits.
@pytest.mark.parametrize("m,n,k,splits,bias", [(1, 96, 384, 3, False), (3, 64, 256, 1, True),
                                               (4, 130, 200, 2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gemv_matches_linear_cpu(m, n, k, splits, bias, dtype):
    require_backend("cpu")
    _check(m, n, k, dtype, "cpu", bias, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 16])
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (2048, 8192), (16384, 2048), (6144, 4096),
                                 (4096, 14336)])
def test_dense_gemv_matches_linear_gpu(m, n, k):
    require_backend("cuda")
    _check(m, n, k, torch.bfloat16, "cuda", bias=m == 2, splits=None)


def test_gemv_linear_is_the_same_layer(monkeypatch):
    require_backend("cpu")
    lin = nn.Linear(256, 96, bias=True)
    ref = copy.deepcopy(lin)
    weight = lin.weight
    assert dg.to_gemv_linear(lin) is lin and isinstance(lin, nn.Linear) and isinstance(lin, dg.GemvLinear)
    assert lin.weight is weight and lin.state_dict().keys() == ref.state_dict().keys()
    monkeypatch.setattr(dg, "use_triton", lambda *t: True)  # the interpreter stands in for CUDA
    calls = []
    real = dg.dense_gemv
    monkeypatch.setattr(dg, "dense_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        for shape in [(1, 1, 256), (2, 1, 256), (1, 9, 256)]:  # 1 and 2 rows take the kernel, 9 do not
            x = torch.randn(*shape)
            assert_close_rel(lin(x), ref(x), 1e-5)
    assert calls == [(1, 256), (2, 256)]
