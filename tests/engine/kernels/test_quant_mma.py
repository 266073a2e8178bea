"""int4 "mma" kernel (quant_mma_triton.py): parity with the reference, its column order, fallbacks."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quant_matmul import int4_matmul_ref, quantize_int4
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _cfg(block_m, block_n, split=None, w_is_a=False, warps=4, stages=2, waves=4):
    from engine.kernels.quant_tuning import TileConfig

    return TileConfig(block_m, block_n, warps, stages, split, "mma", waves=waves, w_is_a=w_is_a)


def _case(device, dtype, m, n, k, group, bias, cfg, calls=1):
    """Fresh weights once, fresh activations each call, written into a NaN-poisoned output."""
    import triton

    from engine.kernels.quant_matmul_triton import _split
    from engine.kernels.quant_mma_triton import int4_mma

    w = torch.randn(n, k, device=device) * 0.05
    q, s = quantize_int4(w, group, dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split, per_split = _split(tiles, k // group, cfg, torch.device(device))
    for _ in range(calls):  # split-K arrival counters must be back at zero for the next call
        x = torch.randn(m, k, device=device).to(dtype)
        y = torch.full((m, n), float("nan"), device=device, dtype=dtype)
        int4_mma(x, q.view(torch.int32), s, b, y, cfg, split, per_split)
        ref = int4_matmul_ref(x.float(), q, s, None if b is None else b.float())
        assert_close_rel(y.float(), ref, TOL[dtype])


def test_column_order_matches_packing():
    """mma_order(): element p, plane d of a group (bits 4d.. of the group's p-th G/4-bit element,
    little-endian) holds the code of the column the order names."""
    from engine.kernels.quant_matmul import pack_int4
    from engine.kernels.quant_mma_triton import PLANE_K, mma_order

    for group in (32, 64, 128):
        k, bits = 2 * group, group // 4
        codes = torch.randint(0, 16, (2, k), dtype=torch.uint8)
        packed = pack_int4(codes, group)  # [2, K/2] bytes
        order = mma_order(k, group, torch.device("cpu"))
        assert sorted(order.tolist()) == list(range(k))
        for g in range(k // group):
            stream = int.from_bytes(bytes(packed[1, g * group // 2:(g + 1) * group // 2].tolist()), "little")
            for q in range(group):
                d, p = divmod(q, PLANE_K)
                nibble = (stream >> (p * bits + 4 * d)) & 15
                assert nibble == int(codes[1, order[g * group + q]])
        if group == 128:
            assert torch.equal(order, torch.arange(k))  # natural order: no gather at G = 128


@pytest.mark.parametrize("m,group,split,bias,w_is_a", [
    (2, 128, None, False, False), (5, 64, 2, True, False), (16, 32, 3, False, True),
    (33, 128, 2, True, True), (16, 128, 1, True, False), (33, 64, None, False, True),
])
def test_mma_cpu(m, group, split, bias, w_is_a):
    require_backend("cpu")
    block_m = 16 if m <= 16 else 64
    _case("cpu", torch.float16, m, 80, 3 * group * 2, group, bias, _cfg(block_m, 64, split, w_is_a), calls=2)


def test_mma_cpu_fp32_and_uneven_split():
    """fp32 activations (exact products), 5 groups over 2 splits (the last split is shorter)."""
    require_backend("cpu")
    _case("cpu", torch.float32, 3, 64, 5 * 128, 128, True, _cfg(16, 64, 2))
    _case("cpu", torch.float16, 4, 48, 5 * 32, 32, False, _cfg(16, 32, 2, w_is_a=True))


def test_mma_cpu_dispatch():
    """quant_matmul_triton routes an "mma" config to the kernel (3-d input, bias); int8 runs as "dot"."""
    require_backend("cpu")
    from engine.kernels.quant_matmul import int8_matmul_ref, quantize_int8
    from engine.kernels.quant_matmul_triton import quant_matmul_triton

    w = torch.randn(40, 256) * 0.05
    q4, s4 = quantize_int4(w, 64, torch.float16)
    x, b = torch.randn(2, 3, 256).to(torch.float16), torch.randn(40).to(torch.float16)
    y = quant_matmul_triton(x, q4, s4, b, 4, _cfg(16, 32, 2))
    assert y.shape == (2, 3, 40)
    assert_close_rel(y.float(), int4_matmul_ref(x.float(), q4, s4, b.float()), TOL[torch.float16])
    w = torch.randn(48, 256) * 0.05
    q, s = quantize_int8(w, torch.float16)
    x = torch.randn(3, 256).to(torch.float16)
    y = quant_matmul_triton(x, q, s, None, 8, _cfg(16, 32, 2))
    assert_close_rel(y.float(), int8_matmul_ref(x.float(), q, s), TOL[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_mma_gpu(m, n, k):
    require_backend("cuda")
    block_m = 16 if m <= 16 else 64
    _case("cuda", torch.bfloat16, m, n, k, 128, m % 2 == 0, _cfg(block_m, 128, w_is_a=m > 16, stages=3), calls=2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,group,block_m,block_n,warps,stages,split,w_is_a,dtype", [
    (16, 128, 16, 64, 4, 4, None, False, torch.bfloat16), (16, 128, 16, 128, 4, 3, 1, False, torch.bfloat16),
    (16, 128, 16, 128, 4, 3, None, True, torch.bfloat16), (4, 128, 16, 256, 8, 3, 3, True, torch.bfloat16),
    (64, 128, 64, 128, 4, 3, None, True, torch.bfloat16), (64, 128, 64, 64, 4, 4, 2, False, torch.bfloat16),
    (48, 128, 32, 128, 4, 3, None, False, torch.bfloat16), (16, 128, 16, 128, 4, 3, None, False, torch.float16),
    (16, 64, 16, 128, 4, 3, None, False, torch.bfloat16), (16, 32, 16, 128, 4, 3, 2, True, torch.bfloat16),
    (7, 128, 16, 64, 4, 3, None, False, torch.float32), (5, 64, 16, 64, 4, 3, None, True, torch.float16),
])
def test_mma_variants_gpu(m, group, block_m, block_n, warps, stages, split, w_is_a, dtype):
    """The variants a sweep may select, at a real shape with a ragged N, twice (counters reset)."""
    require_backend("cuda")
    cfg = _cfg(block_m, block_n, split, w_is_a, warps, stages)
    _case("cuda", dtype, m, 3000, 4096, group, m % 2 == 1, cfg, calls=2)
