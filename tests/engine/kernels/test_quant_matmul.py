"""int8 / int4 weight-only matmul: quantization error of the references, Triton parity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    int4_matmul,
    int4_matmul_ref,
    int8_matmul,
    int8_matmul_ref,
    quantize_int4,
    quantize_int8,
)
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_int8_error_within_half_a_step():
    w = torch.randn(48, 80) * torch.rand(48, 1)  # rows of different ranges
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_and_documented_layout(group):
    n, k = 24, 256
    w = torch.randn(n, k)
    q, s = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (n, k // 2) and s.shape == (n, k // group)
    deq = dequantize_int4(q, s)
    step = s.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # The layout spelled out in quant_matmul.py, element by element for one row and one group.
    row, g, half = 5, 1, group // 2
    for j in range(half):
        byte = int(q[row, g * half + j])
        assert deq[row, g * group + j] == ((byte & 15) - 8) * s[row, g]
        assert deq[row, g * group + half + j] == ((byte >> 4) - 8) * s[row, g]


def test_int4_rejects_bad_group():
    with pytest.raises(ValueError):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError):
        quantize_int4(torch.randn(4, 128), 16)


def test_references_equal_dense_matmul_with_dequantized_weights():
    x, b = torch.randn(3, 7, 128), torch.randn(40)
    w = torch.randn(40, 128)
    q8, s8 = quantize_int8(w)
    assert_close_rel(int8_matmul_ref(x, q8, s8, b), F.linear(x, dequantize_int8(q8, s8), b), 1e-6)
    q4, s4 = quantize_int4(w, 64)
    assert_close_rel(int4_matmul(x, q4, s4, b), F.linear(x, dequantize_int4(q4, s4), b), 1e-6)


def _triton_case(device, dtype, bits, m, n, k, group, split, bias, config=None):
    from engine.kernels.quant_matmul_triton import TileConfig, quant_matmul_triton

    w = torch.randn(n, k, device=device) * 0.05
    q, s = quantize_int8(w, dtype) if bits == 8 else quantize_int4(w, group, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    if config is None and split is not None:
        from engine.kernels.quant_matmul_triton import tile_config

        c = tile_config(m)
        config = TileConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, split)
    y = quant_matmul_triton(x, q, s, b, bits, config)
    ref = (int8_matmul_ref if bits == 8 else int4_matmul_ref)(x.float(), q, s, None if b is None else b.float())
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_rel(y.float(), ref, TOL[dtype])


@pytest.mark.parametrize("m,split,bias", [(1, 1, False), (3, 3, True), (37, None, True)])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_triton_cpu(m, split, bias, group):
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 4, m, 96, 256, group, split, bias)


@pytest.mark.parametrize("m,split,bias", [(1, 2, True), (20, 1, False)])
def test_int8_triton_cpu(m, split, bias):
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 8, m, 80, 384, None, split, bias)


def test_triton_cpu_fp32_group64():
    require_backend("cpu")
    _triton_case("cpu", torch.float32, 4, 2, 64, 192, 64, None, True)


def test_triton_cpu_uneven_split():
    """K steps not divisible by the split: the last split is shorter and must stop at K."""
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 4, 2, 64, 384, 32, 2, False)  # 3 steps of 4 groups over 2 splits
    _triton_case("cpu", torch.float16, 8, 2, 64, 384, None, 2, False)  # 3 steps of 128 over 2 splits


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1536, 14336)])
def test_triton_gpu(bits, group, m, n, k):
    require_backend("cuda")
    _triton_case("cuda", torch.bfloat16, bits, m, n, k, group, None, m % 2 == 0)


@pytest.mark.gpu
def test_dispatchers_gpu_3d_input():
    require_backend("cuda")
    w = torch.randn(512, 1024, device="cuda") * 0.05
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    q8, s8 = quantize_int8(w, torch.bfloat16)
    assert_close_rel(int8_matmul(x, q8, s8).float(), int8_matmul_ref(x.float(), q8, s8), TOL[torch.bfloat16])
    q4, s4 = quantize_int4(w, 128, torch.bfloat16)
    assert_close_rel(int4_matmul(x, q4, s4).float(), int4_matmul_ref(x.float(), q4, s4), TOL[torch.bfloat16])

