"""Batched multi-adapter LoRA: grouping, the torch reference against a per-token float64 loop, Triton against both."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.lora_batched import StaticSegments, add_lora, build_segments, chunk_capacity, lora_batched_ref
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def per_token_float64(y, x, slots, a, b, scaling, rescale=None):
    """y + the literal definition, one token at a time (no grouping), in float64."""
    out = y.double().clone()
    for i, s in enumerate(slots):
        if s < 0:
            continue
        upd = scaling[s].double() * (b[s].double() @ (a[s].double() @ x[i].double()))
        out[i] = out[i] + upd
        if rescale is not None:
            out[i] = out[i] * rescale[s].double()
    return out


def make_case(n, k, n_out, num_slots, r, dtype, device, used=None, dora=False):
    """Random tokens and stacks; slots outside `used` are NaN so any stray read shows up."""
    used = list(range(num_slots)) if used is None else used
    slots = [used[i] for i in torch.randint(0, len(used), (n,)).tolist()]
    for i in torch.randperm(n)[: max(1, n // 4)].tolist():
        slots[i] = -1  # base tokens, scattered
    x = torch.randn(n, k, device=device).to(dtype)
    y = torch.randn(n, n_out, device=device).to(dtype)
    a = torch.full((num_slots, r, k), float("nan"), device=device, dtype=dtype)
    b = torch.full((num_slots, n_out, r), float("nan"), device=device, dtype=dtype)
    scaling = torch.full((num_slots,), float("nan"), device=device)
    rescale = torch.full((num_slots, n_out), float("nan"), device=device) if dora else None
    for s in used:
        a[s] = (torch.randn(r, k, device=device) / k ** 0.5).to(dtype)
        b[s] = torch.randn(n_out, r, device=device).to(dtype)
        scaling[s] = 0.5 + torch.rand(()).item()
        if dora:
            rescale[s] = 0.5 + torch.rand(n_out, device=device)
    return slots, x, y, a, b, scaling, rescale


def test_build_segments_groups_and_chunks():
    slots = [2, -1, 0, 2, 2, -1, 0, 2, 2]
    seg = build_segments(slots, block_m=2)
    assert seg.groups == ((0, 0, 2), (2, 2, 5))
    assert seg.rows.tolist() == [2, 6, 0, 3, 4, 7, 8]
    assert seg.chunk_slot.tolist() == [0, 2, 2, 2]
    assert seg.chunk_start.tolist() == [0, 2, 4, 6]
    assert seg.chunk_len.tolist() == [2, 2, 2, 1]
    assert seg.num_tokens == 9
    assert build_segments([-1, -1]) is None
    assert build_segments([1] * 200).block_m == 64 and build_segments([0, 1, 2]).block_m == 16


@pytest.mark.parametrize("dora", [False, True])
def test_reference_matches_per_token_definition(dora):
    slots, x, y, a, b, scaling, rescale = make_case(37, 48, 40, 5, 8, torch.float32, "cpu", used=[0, 2, 3], dora=dora)
    expected = per_token_float64(y, x, slots, a, b, scaling, rescale)
    base_rows = y[[i for i, s in enumerate(slots) if s < 0]].clone()
    out = lora_batched_ref(y.clone(), x, build_segments(slots), a, b, scaling, rescale)
    assert_close_rel(out, expected, 1e-5)
    assert torch.equal(out[[i for i, s in enumerate(slots) if s < 0]], base_rows)


def test_dispatcher_uses_reference_on_cpu():
    slots, x, y, a, b, scaling, _ = make_case(9, 32, 24, 3, 4, torch.float32, "cpu")
    out = add_lora(y.clone(), x, build_segments(slots), a, b, scaling)
    assert_close_rel(out, per_token_float64(y, x, slots, a, b, scaling), 1e-5)


def _check_triton(device, dtype, n, k, n_out, num_slots, r, used, dora, block_m=None):
    from engine.kernels.lora_batched_triton import lora_batched_triton

    slots, x, y, a, b, scaling, rescale = make_case(n, k, n_out, num_slots, r, dtype, device, used, dora)
    seg = build_segments(slots, device, block_m)
    base = [i for i, s in enumerate(slots) if s < 0]
    before = y[base].clone()
    out = lora_batched_triton(y.clone(), x, seg, a, b, scaling, rescale)
    assert torch.equal(out[base], before), "base-model rows were modified"
    assert_close_rel(out.float(), per_token_float64(y, x, slots, a, b, scaling, rescale).float(), TOL[dtype])
    ref = lora_batched_ref(y.clone(), x, seg, a, b, scaling, rescale)
    assert_close_rel(out.float(), ref.float(), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dora", [False, True])
def test_triton_cpu_decode_shapes(dtype, dora):
    require_backend("cpu")
    # Uneven rank (12 < 16 tile), K over two shrink blocks, N_out over two expand blocks, unused NaN slots.
    _check_triton("cpu", dtype, 23, 200, 136, 6, 12, [0, 1, 4], dora)


def test_triton_cpu_long_groups():
    require_backend("cpu")
    # Groups longer than a tile: chunks of 16 within one slot, split K.
    _check_triton("cpu", torch.float16, 70, 256, 64, 3, 16, [1, 2], False, block_m=16)


def _check_static(device, dtype, k, n_out):
    """Fixed chunk grid as CUDA graphs capture it: padding rows, empty chunks, refills between calls."""
    from engine.kernels.lora_batched_triton import lora_batched_triton

    static = StaticSegments(max_tokens=40, num_slots=5, device=torch.device(device))
    for n, used in ((32, [0, 1, 2, 3, 4]), (20, [3]), (32, [1, 4])):
        slots, x, y, a, b, scaling, rescale = make_case(n, k, n_out, 5, 16, dtype, device, used, dora=True)
        slots[-3:] = [-1, -1, -1]  # the bucket's padding rows
        static.fill(slots[:-3], n)
        seg = static.view(n)
        assert seg.num_chunks == chunk_capacity(n, 5)
        base = [i for i, s in enumerate(slots) if s < 0]
        out = lora_batched_triton(y.clone(), x, seg, a, b, scaling, rescale)
        assert torch.equal(out[base], y[base])
        assert_close_rel(out.float(), per_token_float64(y, x, slots, a, b, scaling, rescale).float(), TOL[dtype])


def test_triton_cpu_static_segments():
    require_backend("cpu")
    _check_static("cpu", torch.float32, 96, 80)


@pytest.mark.gpu
def test_triton_gpu_static_segments():
    require_backend("cuda")
    _check_static("cuda", torch.bfloat16, 2048, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,num_used", [(64, 1), (64, 32), (2048, 8)])
@pytest.mark.parametrize("k,n_out", [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)])
def test_triton_gpu_real_shapes(dtype, n, num_used, k, n_out):
    require_backend("cuda")
    _check_triton("cuda", dtype, n, k, n_out, 33, 16, list(range(num_used)), False)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 64])
def test_triton_gpu_dora_and_ranks(r):
    require_backend("cuda")
    _check_triton("cuda", torch.bfloat16, 64, 2048, 8192, 9, r, [0, 3, 5, 8], True)
