"""torch's packed CPU kernels behind int8_matmul / int4_matmul (engine/kernels/quant_matmul_cpu.py)."""
from __future__ import annotations

import pytest
import torch

import engine.kernels.quant_matmul_cpu as qcpu
from engine.kernels.quant_matmul import (
    int4_matmul,
    int4_matmul_ref,
    int8_matmul,
    int8_matmul_ref,
    quantize_int4,
    quantize_int8,
)
from engine.kernels.testing import assert_close_rel
from engine.quant import QuantLinear

pytestmark = pytest.mark.skipif(not qcpu.cpu_kernels_available(), reason="this torch has no packed CPU kernels")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _spy(monkeypatch, name):
    calls = []
    real = getattr(qcpu, name)
    monkeypatch.setattr(qcpu, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int4_matches_the_reference(monkeypatch, dtype, group_size, rows):
    calls = _spy(monkeypatch, "int4_matmul_cpu")
    w = torch.randn(48, 256) * 0.05
    q, s = quantize_int4(w, group_size, dtype)
    x = torch.randn(rows, 256).to(dtype)
    out = int4_matmul(x, q, s)
    assert calls, "the packed kernel did not run"
    assert out.dtype == dtype and out.shape == (rows, 48)
    assert_close_rel(out, int4_matmul_ref(x, q, s), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 128])
def test_int8_matches_the_reference(monkeypatch, dtype, rows):
    calls = _spy(monkeypatch, "int8_matmul_cpu")
    w = torch.randn(40, 96) * 0.05
    q, s = quantize_int8(w, dtype)
    x = torch.randn(rows, 96).to(dtype)
    out = int8_matmul(x, q, s)
    assert calls, "the packed kernel did not run"
    assert_close_rel(out, int8_matmul_ref(x, q, s), TOL[dtype])


def _misaligned(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of t whose data starts offset_bytes past a 64-byte boundary (as a tensor mapped from
    a safetensors file can)."""
    pad = offset_bytes // t.element_size()
    view = torch.empty(t.numel() + pad, dtype=t.dtype)[pad:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 64 == offset_bytes
    return view


def test_int8_weight_not_64_byte_aligned():
    # torch's int8 kernel crashes on such a weight; the dispatcher hands it an aligned copy.
    q, s = quantize_int8(torch.randn(2048, 2048) * 0.05, torch.bfloat16)
    q_mapped = _misaligned(q, 40)
    x = torch.randn(43, 2048).to(torch.bfloat16)
    assert_close_rel(int8_matmul(x, q_mapped, s), int8_matmul_ref(x, q, s), 1e-2)
    q_mapped.copy_(quantize_int8(torch.randn(2048, 2048) * 0.05, torch.bfloat16)[0])  # the copy follows
    assert_close_rel(int8_matmul(x, q_mapped, s), int8_matmul_ref(x, q_mapped.clone(), s), 1e-2)


def test_leading_dims_are_kept():
    q, s = quantize_int4(torch.randn(32, 64), 32, torch.float32)
    x = torch.randn(2, 3, 64)
    out = int4_matmul(x, q, s)
    assert out.shape == (2, 3, 32)
    assert_close_rel(out, int4_matmul_ref(x, q, s), 1e-5)


def test_what_the_packed_kernels_do_not_take_goes_to_the_reference(monkeypatch):
    int4_calls, int8_calls = _spy(monkeypatch, "int4_matmul_cpu"), _spy(monkeypatch, "int8_matmul_cpu")
    x = torch.randn(3, 64)
    q4, s4 = quantize_int4(torch.randn(40, 64), 32, torch.float32)  # 40 outputs: not a multiple of 16
    assert torch.equal(int4_matmul(x, q4, s4), int4_matmul_ref(x, q4, s4))
    q4, s4 = quantize_int4(torch.randn(32, 64), 32, torch.float32)
    bias = torch.randn(32)
    assert torch.equal(int4_matmul(x, q4, s4, bias), int4_matmul_ref(x, q4, s4, bias))
    acc, acc_ref = torch.randn(3, 32), None
    acc_ref = acc.clone()
    int4_matmul(x, q4, s4, accumulate=acc)
    assert torch.equal(acc, int4_matmul_ref(x, q4, s4, accumulate=acc_ref))
    assert int4_calls == [] and int8_calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_dequantize_once_and_match_the_reference(monkeypatch, dtype, bits):
    rows = qcpu.INT8_DENSE_MIN_ROWS if bits == 8 else qcpu.INT4_DENSE_MIN_ROWS
    packed = _spy(monkeypatch, "int8_matmul_cpu" if bits == 8 else "int4_matmul_cpu")
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", None)  # the row-by-row kernels must not run
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    w = torch.randn(48, 256) * 0.05
    q, s = quantize_int8(w, dtype) if bits == 8 else quantize_int4(w, 64, dtype)
    x = torch.randn(rows, 256).to(dtype)
    matmul, ref = (int8_matmul, int8_matmul_ref) if bits == 8 else (int4_matmul, int4_matmul_ref)
    out = matmul(x, q, s)
    assert packed and out.dtype == dtype
    assert_close_rel(out, ref(x, q, s), TOL[dtype])


def test_int4_pack_follows_weights_written_in_place():
    q, s = quantize_int4(torch.randn(32, 64), 32, torch.float32)
    x = torch.randn(2, 64)
    before = int4_matmul(x, q, s)
    q2, s2 = quantize_int4(torch.randn(32, 64), 32, torch.float32)
    q.copy_(q2)  # a checkpoint load writes buffers like this
    s.copy_(s2)
    after = int4_matmul(x, q, s)
    assert not torch.allclose(before, after)
    assert_close_rel(after, int4_matmul_ref(x, q2, s2), 1e-5)


def test_quant_linear_on_cpu_runs_the_packed_kernel(monkeypatch):
    calls = _spy(monkeypatch, "int4_matmul_cpu")
    dense = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    layer = QuantLinear.from_linear(dense, 4, 64)
    x = torch.randn(4, 128).to(torch.bfloat16)
    assert_close_rel(layer(x), int4_matmul_ref(x, layer.qweight, layer.scales), 1e-2)
    assert len(calls) == 1
