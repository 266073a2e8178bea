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
    # The layout spelled out in quant_matmul.py, element by element for one row and one group,
    # read both as bytes and as little-endian 32-bit words.
    row, g, words = 5, 1, group // 8
    as_words = q.view(torch.int32)
    for w in range(words):
        word = int(as_words[row, g * words + w]) & 0xFFFFFFFF
        for i in range(8):
            byte = int(q[row, g * group // 2 + 4 * w + i // 2])
            nibble = (word >> (4 * i)) & 15
            assert nibble == (byte >> (4 * (i % 2))) & 15
            assert deq[row, g * group + i * words + w] == (nibble - 8) * s[row, g]


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


def _config(m, kernel, split=None, prefetch=2, block_n=None, block_k=128):
    from engine.kernels.quant_tuning import TileConfig

    if kernel == "gemv":
        return TileConfig(min(4, 1 << (m - 1).bit_length()), block_n or 32, 4, 1, split, "gemv", prefetch, block_k)
    block_m = 16 if m <= 16 else 64
    return TileConfig(block_m, block_n or 32, 4, 2, split, "dot", prefetch, block_k)


def _triton_case(device, dtype, bits, m, n, k, group, bias, config=None, calls=1, accumulate=False):
    """The kernel against the fp32 reference; with `accumulate` the product is added into a
    tensor of earlier values (a residual stream) in place."""
    from engine.kernels.quant_matmul_triton import quant_matmul_triton

    w = torch.randn(n, k, device=device) * 0.05
    q, s = quantize_int8(w, dtype) if bits == 8 else quantize_int4(w, group, dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    for _ in range(calls):  # split-K arrival counters must be back at zero for the next call
        x = torch.randn(m, k, device=device).to(dtype)
        ref = (int8_matmul_ref if bits == 8 else int4_matmul_ref)(x.float(), q, s, None if b is None else b.float())
        if accumulate:
            before = torch.randn(m, n, device=device).to(dtype) * 4
            target = before.clone()
            y = quant_matmul_triton(x, q, s, b, bits, config, accumulate=target)
            assert y.data_ptr() == target.data_ptr()
            ref = ref + before.float()
        else:
            y = quant_matmul_triton(x, q, s, b, bits, config)
        assert y.shape == (m, n) and y.dtype == dtype
        assert_close_rel(y.float(), ref, TOL[dtype])


@pytest.mark.parametrize("m,split,bias", [(1, 1, False), (3, 3, True), (37, None, True)])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dot_cpu(m, split, bias, group):
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 4, m, 96, 256, group, bias, _config(m, "dot", split, prefetch=split or 0))


@pytest.mark.parametrize("m,split,bias,prefetch", [(1, 2, False, 2), (3, 3, True, 0), (2, None, True, 2)])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_gemv_cpu(m, split, bias, prefetch, group):
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 4, m, 80, 512, group, bias, _config(m, "gemv", split, prefetch), calls=2)


@pytest.mark.parametrize("kernel,m,split,bias", [("dot", 1, 2, True), ("dot", 20, 1, False),
                                                 ("gemv", 1, 3, True), ("gemv", 4, 1, False)])
def test_int8_triton_cpu(kernel, m, split, bias):
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 8, m, 80, 384, None, bias, _config(m, kernel, split), calls=2)


@pytest.mark.parametrize("bits,kernel,m,split", [(4, "gemv", 1, 1), (4, "gemv", 2, 3), (4, "dot", 3, 2),
                                                  (8, "gemv", 1, 2), (8, "dot", 20, 1)])
def test_triton_cpu_accumulates_into_the_output(bits, kernel, m, split):
    """out += x W^T in place (the residual add of a folded layer), with and without split K."""
    require_backend("cpu")
    _triton_case("cpu", torch.float16, bits, m, 80, 256, 64 if bits == 4 else None, m == 2,
                 _config(m, kernel, split), calls=2, accumulate=True)


def test_dispatchers_accumulate_on_the_cpu():
    """The torch references add into `accumulate` in fp32 and round once."""
    w, x = torch.randn(40, 128), torch.randn(3, 128, dtype=torch.bfloat16)
    before = torch.randn(3, 40, dtype=torch.bfloat16)
    for q, s, fn, deq in ((*quantize_int8(w), int8_matmul, dequantize_int8),
                          (*quantize_int4(w, 64), int4_matmul, dequantize_int4)):
        target = before.clone()
        assert fn(x, q, s, accumulate=target) is target
        want = (before.float() + F.linear(x.float(), deq(q, s))).to(torch.bfloat16)
        assert torch.equal(target, want)


def test_int8_gemv_cpu_step_not_dividing_k():
    """K = 96 is no multiple of block_k = 128: the step shrinks to a power of two dividing K."""
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 8, 2, 48, 96, None, False, _config(2, "gemv", 2, block_k=128))


@pytest.mark.parametrize("kernel", ["dot", "gemv"])
def test_triton_cpu_fp32_group64(kernel):
    require_backend("cpu")
    _triton_case("cpu", torch.float32, 4, 2, 64, 192, 64, True, _config(2, kernel, 2))


def test_triton_cpu_uneven_split():
    """K steps not divisible by the split: the last split is shorter and must stop at K."""
    require_backend("cpu")
    _triton_case("cpu", torch.float16, 4, 2, 64, 160, 32, False, _config(2, "dot", 2))  # 5 groups over 2 splits
    _triton_case("cpu", torch.float16, 4, 1, 64, 160, 32, False, _config(1, "gemv", 2))
    _triton_case("cpu", torch.float16, 8, 2, 64, 384, None, False, _config(2, "dot", 2))  # 3 steps of 128


def test_default_configs_cpu():
    """Whatever tile_config picks (table or heuristic) computes the right thing."""
    require_backend("cpu")
    for bits, m in ((4, 1), (4, 5), (8, 1), (8, 9)):
        _triton_case("cpu", torch.float16, bits, m, 64, 256, 64 if bits == 4 else None, True)


def test_split_counters_return_to_zero():
    require_backend("cpu")
    from engine.kernels.quant_split_triton import split_locks

    _triton_case("cpu", torch.float16, 4, 1, 64, 512, 32, False, _config(1, "gemv", 4), calls=2)
    assert int(split_locks(torch.device("cpu"), 1).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1536, 14336)])
def test_triton_gpu(bits, group, m, n, k):
    require_backend("cuda")
    _triton_case("cuda", torch.bfloat16, bits, m, n, k, group, m % 2 == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,m,bits,group,split,prefetch,block_n", [
    ("gemv", 1, 4, 128, None, 2, 128), ("gemv", 1, 4, 128, 1, 0, 256), ("gemv", 3, 4, 32, 3, 2, 64),
    ("gemv", 1, 8, None, 2, 2, 128), ("gemv", 4, 8, None, None, 0, 64),
    ("dot", 1, 4, 128, None, 2, 128), ("dot", 4, 4, 64, 3, 0, 64), ("dot", 16, 4, 128, 1, 2, 256),
    ("dot", 16, 4, 32, None, 2, 32), ("dot", 40, 4, 128, 2, 2, 128),
    ("dot", 4, 8, None, None, 2, 128), ("dot", 16, 8, None, 2, 2, 64),
])
def test_kernel_variants_gpu(kernel, m, bits, group, split, prefetch, block_n):
    """The variants a benchmark sweep may select, at a real shape, twice (split counters reset)."""
    require_backend("cuda")
    cfg = _config(m, kernel, split, prefetch, block_n)
    _triton_case("cuda", torch.bfloat16, bits, m, 3072, 4096, group, m != 1, cfg, calls=2, accumulate=m < 4)


@pytest.mark.gpu
def test_dispatchers_gpu_3d_input():
    require_backend("cuda")
    w = torch.randn(512, 1024, device="cuda") * 0.05
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    q8, s8 = quantize_int8(w, torch.bfloat16)
    assert_close_rel(int8_matmul(x, q8, s8).float(), int8_matmul_ref(x.float(), q8, s8), TOL[torch.bfloat16])
    q4, s4 = quantize_int4(w, 128, torch.bfloat16)
    assert_close_rel(int4_matmul(x, q4, s4).float(), int4_matmul_ref(x.float(), q4, s4), TOL[torch.bfloat16])



def test_tuned_table_lookup(tmp_path, monkeypatch):
    """Exact entries win, near shapes borrow them, far shapes fall back to the heuristic."""
    import json

    from engine.kernels import quant_tuning as qt

    cfg = qt.TileConfig(4, 256, 8, 1, 3, "gemv", 0, 128, 2, 1)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"entries": {qt.tuning_key(4, 128, 3, 4096, 14336): cfg.to_dict()}}))
    monkeypatch.setenv("EMBER_QUANT_TUNING", str(path))
    assert qt.tile_config(4, 14336, 4096, 4, 128) == cfg  # M 4 shares bucket 4 with M 3
    assert qt.tile_config(3, 28672, 4096, 4, 128) == cfg  # N within a factor of two
    assert qt.tile_config(3, 14336, 4096, 4, 64) == qt.default_config(3, 4)  # other group
    assert qt.tile_config(3, 14336, 16384, 4, 128) == qt.default_config(3, 4)  # K 4x away
    assert qt.tile_config(2048, 14336, 4096, 4, 128).kernel == "dequant"


def _committed_configs():
    """Each distinct (bits, group, M bucket, config) of the committed tuned table."""
    import re

    from engine.kernels.quant_tuned import TUNED

    seen = {}
    for key, entry in TUNED.items():  # "int4/g128/m1/k4096/n14336"
        bits, group, m = map(int, re.fullmatch(r"int(\d+)/g(\d+)/m(\d+)/k\d+/n\d+", key).groups())
        seen.setdefault((bits, group or None, m, tuple(sorted(entry.items()))), key)
    return sorted(seen.items(), key=lambda item: item[1])


@pytest.mark.parametrize("case", [c for c, _ in _committed_configs()], ids=[k for _, k in _committed_configs()])
def test_every_committed_tuned_config_computes_the_reference(case):
    """The winners in quant_tuned.py, at a small shape of their own bits, group and M: each still
    names a kernel and launch shape that runs and matches the reference (split K included)."""
    from engine.kernels.quant_tuning import KERNELS, TileConfig

    require_backend("cpu")
    bits, group, m, items = case
    cfg = TileConfig.from_dict(dict(items))
    assert cfg.kernel in KERNELS
    k = 4 * group if bits == 4 else 512
    _triton_case("cpu", torch.float16, bits, m, 2 * cfg.block_n, k, group, False, cfg)
