"""Dense bf16 / fp16 GEMV (batch-1 decode projections): Triton parity and the dispatcher's choices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import dense_matmul
from engine.kernels.dense_matmul import dense_linear
from engine.kernels.quant_tuning import DENSE_BITS, TileConfig, tile_config
from engine.kernels.testing import assert_close_rel, require_backend

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _ref(x, w, bias, before):
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y if before is None else y + before.float()


def _case(device, dtype, n, k, cfg=None, bias=False, accumulate=False, calls=2, forced=True):
    """dense_linear at one activation row against the fp32 reference, `calls` times (split-K
    arrival counters must be back at zero for the next call)."""
    w = (torch.randn(n, k, device=device) * 0.05).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    for _ in range(calls):
        x = torch.randn(1, 1, k, device=device).to(dtype)
        before = (torch.randn(1, 1, n, device=device) * 4).to(dtype) if accumulate else None
        target = before.clone() if accumulate else None
        y = dense_linear(x, w, b, accumulate=target, config=cfg)
        if accumulate:
            assert y is target
        assert y.shape == (1, 1, n) and y.dtype == dtype
        assert_close_rel(y.float(), _ref(x, w, b, before), TOL[dtype])


@pytest.fixture
def gemv_on(monkeypatch):
    monkeypatch.setenv("EMBER_DENSE_GEMV", "1")


@pytest.fixture
def forced(monkeypatch, gemv_on):
    """Point the dispatcher at the Triton GEMV for CPU tensors (the interpreter runs it)."""
    require_backend("cpu")
    calls = []
    from engine.kernels import dense_gemv_triton

    real = dense_gemv_triton.dense_gemv

    def spy(*args, **kw):
        calls.append(args[4:8])  # block_n, block_k, num_warps, split
        return real(*args, **kw)

    monkeypatch.setattr(dense_matmul, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(dense_gemv_triton, "dense_gemv", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,block_n,block_k,split,prefetch,bias,accumulate", [
    (40, 256, 16, 64, 1, 2, False, False),   # rows past N re-read row N - 1 and are never stored
    (48, 512, 16, 64, 3, 2, True, False),    # 8 steps over 3 slices: the last slice is shorter
    (32, 192, 32, 64, 2, 0, False, True),    # no ring; the residual add in the split epilogue
    (24, 128, 8, 128, None, 2, True, True),  # one step a slice; split from the waves
])
def test_triton_gemv_cpu(forced, dtype, n, k, block_n, block_k, split, prefetch, bias, accumulate):
    cfg = TileConfig(1, block_n, 2, 1, split, "gemv", prefetch, block_k)
    _case("cpu", dtype, n, k, cfg, bias, accumulate)
    assert forced and forced[0][:2] == (block_n, block_k)
    if split:
        assert forced[0][3] == split


def test_block_k_shrinks_to_divide_k(forced):
    """K = 192 is no multiple of the config's 128 columns: the step halves to 64."""
    _case("cpu", torch.float16, 16, 192, TileConfig(1, 16, 2, 1, 1, "gemv", 2, 128), calls=1)
    assert forced[0][1] == 64


def test_default_config_computes_the_right_thing(forced):
    cfg = tile_config(1, 64, 512, DENSE_BITS)
    assert cfg.kernel == "gemv" and cfg.block_k == 256
    _case("cpu", torch.bfloat16, 64, 512, calls=1)
    assert forced


def test_poisoned_output_is_overwritten(forced):
    """Every output element is written, whatever the scratch held before."""
    from engine.kernels.dense_gemv_triton import dense_gemv

    w = torch.randn(40, 256).half()
    x = torch.randn(1, 256).half()
    out = torch.full((1, 40), float("nan"), dtype=torch.float16)
    dense_gemv(x, w, None, out, 16, 64, 2, 2, 2)
    assert_close_rel(out.float(), _ref(x, w, None, None), TOL[torch.float16])


@pytest.mark.parametrize("rows,dtype,k", [(2, torch.float16, 256), (1, torch.float32, 256), (1, torch.float16, 96)])
def test_dispatcher_keeps_torch_where_the_gemv_does_not_apply(forced, rows, dtype, k):
    """Several rows, fp32, or K not a multiple of 64: F.linear / addmm_, never the kernel."""
    w = torch.randn(24, k).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    assert torch.equal(dense_linear(x, w), F.linear(x, w))
    before = torch.randn(rows, 24).to(dtype)
    target = before.clone()
    assert dense_linear(x, w, accumulate=target) is target
    assert torch.equal(target, torch.addmm(before, x, w.t()))
    assert not forced


def test_a_cublas_entry_keeps_the_shape_with_torch(forced):
    """A sweep that found cuBLAS faster for a shape records "cublas": the dispatcher obeys."""
    from engine.kernels import quant_tuning as qt

    key = qt.tuning_key(DENSE_BITS, None, 1, 320, 24)
    qt.register_tuned({key: TileConfig(1, 32, 4, 1, kernel="cublas")})
    try:
        _case("cpu", torch.float16, 24, 320, calls=1, accumulate=True)
        assert not forced
        _case("cpu", torch.float16, 24, 256, calls=1)  # a neighbour shape within 2x borrows the entry
        assert not forced
        _case("cpu", torch.float16, 24, 1024, calls=1)  # K 3.2x away: the heuristic's GEMV
        assert forced
    finally:
        qt._REGISTERED.pop(key)
        qt._MEMO.clear()


def _committed_dense():
    from engine.kernels.quant_tuned import TUNED

    return sorted({tuple(sorted(v.items())) for k, v in TUNED.items() if k.startswith("dense/")})


@pytest.mark.parametrize("items", _committed_dense())
def test_every_committed_dense_entry_computes_the_reference(forced, items):
    cfg = TileConfig.from_dict(dict(items))
    from engine.kernels.quant_tuning import DENSE_KERNELS

    assert cfg.kernel in DENSE_KERNELS
    _case("cpu", torch.bfloat16, 2 * cfg.block_n, 4 * cfg.block_k, cfg, calls=1, accumulate=True)


@pytest.mark.parametrize("value", ["0", ""])
def test_the_gemv_is_off_unless_switched_on(forced, monkeypatch, value):
    monkeypatch.setenv("EMBER_DENSE_GEMV", value)
    _case("cpu", torch.float16, 16, 128, calls=1)
    assert not forced
    monkeypatch.setenv("EMBER_DENSE_GEMV", "1")
    _case("cpu", torch.float16, 16, 128, calls=1)
    assert forced


def test_torch_path_on_the_cpu_adds_bias_and_accumulates():
    w, b = torch.randn(24, 64), torch.randn(24)
    x, before = torch.randn(3, 64), torch.randn(3, 24)
    target = before.clone()
    dense_linear(x, w, b, accumulate=target)
    torch.testing.assert_close(target, before + F.linear(x, w, b))


def test_folded_bf16_model_decodes_one_token_through_the_gemv(forced, monkeypatch):
    """A folded bf16 model at one token: q/k/v, gate/up and the residual adds of o/down run the
    GEMV (four calls a layer) and give the torch path's logits within bf16 tolerance."""
    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.norm_folding import fold_norms

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(cfg)
    model.init_weights(4)
    model = fold_norms(model.to(torch.bfloat16).eval())
    ids = torch.randint(0, 96, (1, 1))
    with torch.no_grad():
        monkeypatch.setenv("EMBER_DENSE_GEMV", "0")
        want = model(ids).float()
        monkeypatch.setenv("EMBER_DENSE_GEMV", "1")
        got = model(ids).float()
    assert len(forced) == 4 * cfg.num_hidden_layers
    assert_close_rel(got, want, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (6144, 4096),
                                 (4096, 14336)])
def test_gemv_gpu(gemv_on, dtype, n, k):
    """The decode projections' shapes, default dispatch (tuned or heuristic), with and without the
    residual add."""
    require_backend("cuda")
    _case("cuda", dtype, n, k)
    _case("cuda", dtype, n, k, accumulate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("block_n,block_k,warps,split,prefetch", [
    (16, 256, 2, None, 2), (32, 256, 4, 1, 2), (64, 128, 4, 3, 0), (8, 512, 1, None, 2), (32, 512, 8, 5, 2)])
def test_gemv_variants_gpu(gemv_on, block_n, block_k, warps, split, prefetch):
    """The variants a benchmark sweep may select, at a real shape."""
    require_backend("cuda")
    cfg = TileConfig(1, block_n, warps, 1, split, "gemv", prefetch, block_k)
    _case("cuda", torch.bfloat16, 3072, 4096, cfg, bias=True, accumulate=True)
