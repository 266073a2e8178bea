"""Batched multi-adapter LoRA: grouping, the torch reference against a per-token float64 loop, Triton against both."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.lora_batched import (StaticSegments, add_lora, add_lora_expand, build_segments, chunk_buckets,
                                        chunk_capacity, SMALL_BLOCK_M, lora_batched_ref, lora_expand_ref)
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def diagonal_mask(n_out, r, slices, device="cpu"):
    """[N, R] True inside a packed layer's diagonal blocks: slice i's output rows by its rank columns."""
    bounds = list(slices) + [n_out]
    rank = r // len(slices)
    mask = torch.zeros(n_out, r, dtype=torch.bool, device=device)
    for i in range(len(slices)):
        mask[bounds[i]:bounds[i + 1], i * rank:(i + 1) * rank] = True
    return mask


def per_token_float64(y, x, slots, a, b, scaling, rescale=None, slices=None):
    """y + the literal definition, one token at a time (no grouping), in float64."""
    if slices:
        b = torch.where(diagonal_mask(*b.shape[1:], slices, b.device), b, 0)
    out = y.double().clone()
    for i, s in enumerate(slots):
        if s < 0:
            continue
        upd = scaling[s].double() * (b[s].double() @ (a[s].double() @ x[i].double()))
        out[i] = out[i] + upd
        if rescale is not None:
            out[i] = out[i] * rescale[s].double()
    return out


def make_case(n, k, n_out, num_slots, r, dtype, device, used=None, dora=False, slices=None):
    """Random tokens and stacks; slots outside `used` are NaN so any stray read shows up, and so are a
    packed layer's off-diagonal blocks of B when `slices` are given."""
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
        if slices:
            b[s] = torch.where(diagonal_mask(n_out, r, slices, device), b[s], float("nan"))
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


def stacked_product(x, a):
    """What the base GEMM's extra rows give: every slot's x A^T side by side, [N, S x R] in x's dtype (NaN
    columns for the unused slots, whose A is NaN)."""
    return (x.float() @ a.reshape(-1, a.shape[-1]).float().T).to(x.dtype)


@pytest.mark.parametrize("dora", [False, True])
def test_expand_reference_from_the_stacked_product(dora):
    slices = (0, 24, 32)
    slots, x, y, a, b, scaling, rescale = make_case(29, 40, 40, 5, 12, torch.float32, "cpu", [0, 3, 4], dora, slices)
    out = lora_expand_ref(y.clone(), stacked_product(x, a), build_segments(slots), b, scaling, rescale, slices)
    assert not out.isnan().any(), "another slot's (NaN) columns were read"
    assert_close_rel(out, per_token_float64(y, x, slots, a, b, scaling, rescale, slices), 1e-5)
    assert torch.equal(add_lora_expand(y.clone(), stacked_product(x, a), build_segments(slots), b, scaling, rescale,
                                       slices), out)


def _check_triton_stacked(device, dtype, n, k, n_out, num_slots, r, used, dora, slices=None, static=False):
    """The expand reading each token's slot columns of the stacked product (a strided view of one GEMM's
    output, as the serving layer passes it) against the reference and the float64 definition."""
    from engine.kernels.lora_batched_triton import lora_expand_triton

    slots, x, y, a, b, scaling, rescale = make_case(n, k, n_out, num_slots, r, dtype, device, used, dora, slices)
    out = torch.cat([y, stacked_product(x, a)], dim=1)  # [N, N_out + S x R], like F.linear on the stacked rows
    y_view, t_view = out[:, :n_out], out[:, n_out:]
    if static:
        segments = StaticSegments(n, num_slots, torch.device(device))
        segments.fill(slots, n)
        seg = segments.view(n)
    else:
        seg = build_segments(slots, device)
    base = [i for i, s in enumerate(slots) if s < 0]
    lora_expand_triton(y_view, t_view, seg, b, scaling, rescale, slices)
    assert torch.equal(y_view[base], y[base]), "base-model rows were modified"
    assert_close_rel(y_view.float(), per_token_float64(y, x, slots, a, b, scaling, rescale, slices).float(), TOL[dtype])
    ref = lora_expand_ref(y.clone(), stacked_product(x, a), build_segments(slots), b, scaling, rescale, slices)
    assert_close_rel(y_view.float(), ref.float(), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dora", [False, True])
def test_triton_cpu_expand_from_the_stacked_product(dtype, dora):
    require_backend("cpu")
    _check_triton_stacked("cpu", dtype, 23, 64, 136, 6, 12, [0, 1, 4], dora, slices=(0, 72, 104))
    _check_triton_stacked("cpu", dtype, 19, 32, 40, 4, 16, [1, 3], dora, static=True)


def _check_triton(device, dtype, n, k, n_out, num_slots, r, used, dora, block_m=None, slices=None):
    from engine.kernels.lora_batched_triton import lora_batched_triton

    slots, x, y, a, b, scaling, rescale = make_case(n, k, n_out, num_slots, r, dtype, device, used, dora, slices)
    seg = build_segments(slots, device, block_m)
    base = [i for i, s in enumerate(slots) if s < 0]
    before = y[base].clone()
    out = lora_batched_triton(y.clone(), x, seg, a, b, scaling, rescale, slices)
    assert torch.equal(out[base], before), "base-model rows were modified"
    expected = per_token_float64(y, x, slots, a, b, scaling, rescale, slices).float()
    assert_close_rel(out.float(), expected, TOL[dtype])
    ref = lora_batched_ref(y.clone(), x, seg, a, b, scaling, rescale, slices)
    assert_close_rel(out.float(), ref.float(), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dora", [False, True])
def test_triton_cpu_decode_shapes(dtype, dora):
    require_backend("cpu")
    # Uneven rank (12 < 16 tile), K over two shrink blocks, N_out over two expand blocks, unused NaN slots.
    _check_triton("cpu", dtype, 23, 200, 136, 6, 12, [0, 1, 4], dora)


@pytest.mark.parametrize("dora", [False, True])
def test_reference_reads_only_the_diagonal_blocks_of_a_packed_layer(dora):
    slices = (0, 24, 32)  # q, k, v outputs of 24, 8, 8 rows; rank 4 each
    slots, x, y, a, b, scaling, rescale = make_case(19, 40, 40, 4, 12, torch.float32, "cpu", [1, 3], dora, slices)
    out = lora_batched_ref(y.clone(), x, build_segments(slots), a, b, scaling, rescale, slices)
    assert not out.isnan().any(), "an off-diagonal (NaN) block of B was read"
    assert_close_rel(out, per_token_float64(y, x, slots, a, b, scaling, rescale, slices), 1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_triton_cpu_packed_slices(dora):
    require_backend("cpu")
    # Three slices whose bounds fall inside the first 128-column tile, a second tile inside the last slice;
    # a rank of 6 per slice (under the 16-wide tile); NaN off-diagonal blocks.
    _check_triton("cpu", torch.float16, 21, 64, 136, 4, 18, [0, 2], dora, slices=(0, 72, 104))


@pytest.mark.parametrize("dora", [False, True])
def test_triton_cpu_expand_walks_several_tiles(dora):
    require_backend("cpu")
    from engine.kernels._triton_util import num_sms
    from engine.kernels.lora_batched_triton import expand_tile

    # Eleven 128-column tiles (the last partial) over three slices whose bounds fall inside tiles; enough
    # chunks that each expand program walks several tiles, the last program a shorter run.
    _, _, per_program = expand_tile(1300, 6, 16, num_sms(torch.device("cpu")))
    assert 1 < per_program < 11 and 11 % per_program
    _check_triton("cpu", torch.float16, 40, 64, 1300, 8, 12, [0, 2, 3, 5, 6, 7], dora, slices=(0, 700, 1000))


def test_triton_cpu_long_groups():
    require_backend("cpu")
    # Groups longer than a tile: chunks of 16 within one slot, split K.
    _check_triton("cpu", torch.float16, 70, 256, 64, 3, 16, [1, 2], False, block_m=16)


def _check_static(device, dtype, k, n_out, slices=None):
    """Fixed chunk grids as CUDA graphs capture them: padding rows, empty chunks, refills between calls,
    each step run in every captured grid that holds its chunks (a grid of exactly its chunks included)."""
    from engine.kernels.lora_batched_triton import lora_batched_triton

    static = StaticSegments(max_tokens=40, num_slots=5, device=torch.device(device))
    for n, used in ((32, [0, 1, 2, 3, 4]), (20, [3]), (32, [1, 4])):
        slots, x, y, a, b, scaling, rescale = make_case(n, k, n_out, 5, 16 if slices is None else 24, dtype, device,
                                                        used, dora=True, slices=slices)
        slots[-3:] = [-1, -1, -1]  # the bucket's padding rows
        chunks = static.fill(slots[:-3], n)
        assert chunks == real_chunks(slots) == build_segments(slots).num_chunks
        grids = [c for c in chunk_buckets(n, 5) if c >= chunks]
        assert grids[-1] == chunk_capacity(n, 5)
        base = [i for i, s in enumerate(slots) if s < 0]
        expected = per_token_float64(y, x, slots, a, b, scaling, rescale, slices).float()
        for c in sorted({chunks, grids[0], grids[-1]}):
            seg = static.view(n, c)
            assert seg.num_chunks == c
            out = lora_batched_triton(y.clone(), x, seg, a, b, scaling, rescale, slices)
            assert torch.equal(out[base], y[base])
            assert_close_rel(out.float(), expected, TOL[dtype])
            ref = lora_batched_ref(y.clone(), x, seg, a, b, scaling, rescale, slices)  # from the chunk arrays
            assert_close_rel(ref.float(), expected, TOL[dtype])


def test_triton_cpu_static_segments():
    require_backend("cpu")
    _check_static("cpu", torch.float32, 96, 80, slices=(0, 48))


def real_chunks(token_slots) -> int:
    """Chunks of decode-sized groups (SMALL_BLOCK_M tokens) that these token slots form."""
    seg = build_segments(token_slots, block_m=SMALL_BLOCK_M)
    return seg.num_chunks if seg is not None else 0


def test_chunk_buckets_follow_the_real_work():
    assert chunk_capacity(64, 32) == 36
    assert chunk_buckets(64, 32) == [4, 8, 16, 32, 36]
    assert chunk_buckets(32, 32) == [4, 8, 16, 32]
    assert chunk_buckets(8, 8) == [4, 8]
    assert chunk_buckets(3, 8) == [3] and chunk_buckets(4, 1) == [1]
    # One adapter over 64 tokens is 4 chunks of 16; 32 adapters over 64 tokens, 32 chunks.
    assert real_chunks([0] * 64) == 4 and real_chunks([i % 32 for i in range(64)]) == 32
    assert real_chunks([-1, 2, -1, 2, 5]) == 2 and real_chunks([-1]) == 0


@pytest.mark.gpu
def test_triton_gpu_static_segments():
    require_backend("cuda")
    _check_static("cuda", torch.bfloat16, 2048, 4096)
    _check_static("cuda", torch.bfloat16, 2048, 3072, slices=(0, 2048, 2560))


@pytest.mark.gpu
@pytest.mark.parametrize("n,num_used", [(64, 1), (64, 32), (1024, 4)])
def test_triton_gpu_packed_shapes(n, num_used):
    require_backend("cuda")
    # Llama-3.2-1B's fused q/k/v (3 slices) and gate/up (2 slices), rank 16 per slice, 33 slots.
    _check_triton("cuda", torch.bfloat16, n, 2048, 3072, 33, 48, list(range(num_used)), False, slices=(0, 2048, 2560))
    _check_triton("cuda", torch.bfloat16, n, 2048, 16384, 33, 32, list(range(num_used)), True, slices=(0, 8192))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,num_used", [(64, 1), (64, 32), (2048, 8)])
@pytest.mark.parametrize("k,n_out", [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)])
def test_triton_gpu_real_shapes(dtype, n, num_used, k, n_out):
    require_backend("cuda")
    _check_triton("cuda", dtype, n, k, n_out, 33, 16, list(range(num_used)), False)


@pytest.mark.gpu
@pytest.mark.parametrize("n,num_used", [(64, 1), (64, 32), (512, 8)])
def test_triton_gpu_expand_from_the_stacked_product(n, num_used):
    require_backend("cuda")
    _check_triton_stacked("cuda", torch.bfloat16, n, 2048, 3072, 33, 48, list(range(num_used)), False,
                          slices=(0, 2048, 2560))
    _check_triton_stacked("cuda", torch.bfloat16, n, 8192, 2048, 33, 16, list(range(num_used)), True, static=True)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 64])
def test_triton_gpu_dora_and_ranks(r):
    require_backend("cuda")
    _check_triton("cuda", torch.bfloat16, 64, 2048, 8192, 9, r, [0, 3, 5, 8], True)
