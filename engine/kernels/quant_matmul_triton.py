"""Triton weight-only int8 / int4 matmuls (formats in quant_matmul.py): launcher and tile kernels.

Two kernel families, chosen per call by tile_config() (quant_tuning.py):
  - "gemv" (quant_gemv_triton.py): FMA on CUDA cores, for M <= 4, where each weight byte is used
    only a few times and the work is streaming the weights with few instructions per byte;
    "gemv_h2" (quant_gemv_h2_triton.py) is its int4 / int8 variant on packed fp16 pairs (PTX:
    CUDA only; elsewhere, or for shapes it does not take, the config runs as "gemv");
  - "mma" (quant_mma_triton.py): int4 on tensor cores whose packed tile reaches tl.dot through
    elementwise operations only, so the pipeliner stages it (int8 configs run as "dot");
  - "dot" (here): a program owns a BLOCK_M x BLOCK_N output tile, turns codes into activation
    dtype values in registers and feeds the tensor cores (tl.dot). int4 codes become MAGIC + c
    by bit operations, two per 32-bit operation (see _nibble_pair), and c - 8 by one exact
    packed subtraction; group scales are applied once per group after the group's dot.
Both split K across programs when the output tiles alone cannot fill the GPU; the partials are
reduced in the same launch (quant_split_triton.py), so a call is one kernel launch.
From DEQUANT_MIN_M rows on, the weight is dequantized once and cuBLAS does the matmul.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels._triton_util import dot_precision, num_sms, pdl_launch, wait_for_inputs
from engine.kernels.quant_gemv_h2_triton import RING_DEPTHS, gemv_h2, gemv_h2_steps, gemv_h2_supported
from engine.kernels.quant_gemv_triton import MAGIC7, _gemv_kernel
from engine.kernels.quant_mma_triton import int4_mma, mma_supported
from engine.kernels.quant_split_triton import split_fixup, split_scratch, store_rows
from engine.kernels.quant_tuning import DEQUANT_MIN_M, TileConfig, tile_config

# Float whose mantissa's last bit is worth 1, per activation dtype (see _codes_as).
_MAGIC = {torch.float16: 1024, torch.bfloat16: 128}
_MAGIC2 = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}  # the 16-bit MAGIC, twice

__all__ = ["DEQUANT_MIN_M", "TileConfig", "quant_matmul_triton", "tile_config"]


@triton.jit
def _codes_as(c, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """4-bit codes c (0..15, any integer type) as `dtype` values MAGIC + c.

    For 16-bit floats the code is OR-ed into the mantissa of MAGIC (1024 in fp16, 128 in bf16,
    where the mantissa's last bit is worth 1): bit operations instead of int-to-float
    conversions. The caller removes MAGIC with the row sums of x. fp32 (MAGIC = 0) converts.
    """
    if MAGIC == 1024:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    elif MAGIC == 128:
        return (c.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        return c.to(dtype)


@triton.jit
def _nibble_pair(wv, magic2, SHIFT: tl.constexpr, dtype: tl.constexpr):
    """Nibbles SHIFT/4 and SHIFT/4 + 4 of each word as a [.., 2] pair of 16-bit MAGIC + code.

    One mask-and-or puts both nibbles into the two halves of a 32-bit value whose halves are
    then the two 16-bit floats (magic2 holds MAGIC's bits twice, in a register: one LOP3).
    """
    t = ((wv >> SHIFT) & 0x000F000F) | magic2
    lo = (t & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
    hi = (t >> 16).to(tl.uint16).to(dtype, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _unpack_words(wv, magic2, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """[R, W] words -> [R, W, 2, 2, 2] values MAGIC + code; element (w, a, b, c) is nibble
    i = 2a + b + 4c, so flattened, word w's nibble i lands at k' = 8 w + 2 (i % 4) + i // 4.

    That order is the one in which _nibble_pair leaves the nibbles in registers: 16-bit pairs
    (i, i + 4) for i = 0..3, so the tile goes to shared memory in 16-byte stores with no
    shuffling; the kernel gathers the activations in the same order.
    """
    if MAGIC == 0:
        a0 = tl.join((wv & 0xF).to(dtype), ((wv >> 16) & 0xF).to(dtype))
        a1 = tl.join(((wv >> 4) & 0xF).to(dtype), ((wv >> 20) & 0xF).to(dtype))
        a2 = tl.join(((wv >> 8) & 0xF).to(dtype), ((wv >> 24) & 0xF).to(dtype))
        a3 = tl.join(((wv >> 12) & 0xF).to(dtype), ((wv >> 28) & 0xF).to(dtype))
    else:
        a0 = _nibble_pair(wv, magic2, 0, dtype)
        a1 = _nibble_pair(wv, magic2, 4, dtype)
        a2 = _nibble_pair(wv, magic2, 8, dtype)
        a3 = _nibble_pair(wv, magic2, 12, dtype)
    # [R, W, h, j0, j1] (nibble j0 + 2 j1 + 4 h) -> [R, W, j1, j0, h]
    return tl.permute(tl.join(tl.join(a0, a1), tl.join(a2, a3)), (0, 1, 4, 3, 2))


@triton.jit
def _int4_dot_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, groups, groups_per_split, magic2,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, MAGIC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    PREFETCH: tl.constexpr,
    X_PERMUTED: tl.constexpr, PDL: tl.constexpr,
):
    WPG: tl.constexpr = GROUP // 8  # 32-bit words per row per group
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    wi = tl.arange(0, WPG)
    w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_wn + wi[None, :]  # [BLOCK_N, WPG]
    # The dot runs over the group's columns in the order the words unpack into (see
    # _unpack_words): position k' = 8 w + 2 j + h holds nibble i = j + 4 h of word w, which is
    # group column i * WPG + w; the activations are gathered to match (X_PERMUTED: the caller
    # already stored x in that order, so the loads are contiguous).
    kp = tl.arange(0, GROUP)
    if X_PERMUTED:
        col = kp
    else:
        col = (((kp % 8) // 2) + 4 * (kp % 2)) * WPG + kp // 8
    x_ptrs = x_ptr + m.to(tl.int64)[:, None] * stride_xm + col[None, :]  # [BLOCK_M, GROUP]
    s_ptrs = s_ptr + n.to(tl.int64) * stride_sn
    # The tile is accumulated transposed (out^T = W x^T): W is the matrix unit's A operand, the
    # one Hopper's wgmma reads with the least shuffling, and M (<= 16 at decode) its narrow side.
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    first = pid_k * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    # Scales feed no tl.dot, so the pipeliner would leave their latency exposed every group:
    # a two-slot register ring requests group g + 2 while group g is computed (weights too
    # with PREFETCH = 2; with PREFETCH = 0 the weight loads are issued where they are used).
    s_a = tl.load(s_ptrs + first, mask=n < tl.where(first < last, N, 0), other=0.0)
    s_b = tl.load(s_ptrs + first + 1, mask=n < tl.where(first + 1 < last, N, 0), other=0.0)
    if PREFETCH == 2:
        w_a = tl.load(w_ptrs + first * WPG, mask=(n < tl.where(first < last, N, 0))[:, None], other=0)
        w_b = tl.load(w_ptrs + (first + 1) * WPG, mask=(n < tl.where(first + 1 < last, N, 0))[:, None], other=0)
    wait_for_inputs(PDL)
    for g in range(first, last):
        sv = s_a
        s_a = s_b
        s_b = tl.load(s_ptrs + g + 2, mask=n < tl.where(g + 2 < last, N, 0), other=0.0)
        if PREFETCH == 2:
            wv = w_a
            w_a = w_b
            w_b = tl.load(w_ptrs + (g + 2) * WPG, mask=(n < tl.where(g + 2 < last, N, 0))[:, None], other=0)
        else:
            wv = tl.load(w_ptrs + g * WPG, mask=n_ok[:, None], other=0)
        xg = tl.load(x_ptrs + g * GROUP, mask=m_ok[:, None], other=0.0)
        wq = tl.reshape(_unpack_words(wv, magic2, xg.dtype, MAGIC), (BLOCK_N, GROUP))  # k' order
        # MAGIC + c - (MAGIC + 8) = c - 8, exact in the 16-bit type (packed HADD2).
        d = tl.dot(wq - (MAGIC + 8.0), tl.trans(xg), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        acc += d * sv.to(tl.float32)[:, None]
    store_rows(tl.trans(acc), m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)


@triton.jit
def _int8_dot_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    n_ok = n < N
    m_ok = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        k_ok = (k0 + kk) < K
        w = tl.load(w_rows + k0 + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = tl.load(x_rows + k0 + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PREC)
    s = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * s[None, :]  # per-channel scale commutes with the K sum
    store_rows(acc, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)


PERMUTE_X_MIN_M = 32


@functools.cache
def _dot_order(k: int, group: int, device: torch.device) -> torch.Tensor:
    """Column of x at each position of the int4 dot kernel's order (see _int4_dot_kernel)."""
    kp = torch.arange(group, device=device)  # built on the device: no host copy inside a graph capture
    col = (((kp % 8) // 2) + 4 * (kp % 2)) * (group // 8) + kp // 8
    return (torch.arange(0, k, group, device=device)[:, None] + col[None, :]).reshape(-1)


def _split(tiles: int, steps: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(splits, steps per split). Default: ~waves programs per SM, each at least min_steps long."""
    if cfg.split_k is not None:
        want = cfg.split_k
    else:
        want = triton.cdiv(cfg.waves * num_sms(device), tiles)
        want = min(want, max(1, steps // cfg.min_steps))
    want = max(1, min(want, steps, 64))
    per_split = triton.cdiv(steps, want)
    return triton.cdiv(steps, per_split), per_split


def quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    config: TileConfig | None = None,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] times the quantized W [N, K] transposed -> [..., N] in x's dtype.

    With `accumulate` (a [..., N] tensor of x's dtype whose rows view as [M, N] with unit column
    stride, not overlapping x) the product is added into it in place and it is returned: rounded
    once in the kernels' epilogue; the dequantize-then-cuBLAS path (large M) adds the product as
    rounded to x's dtype.
    """
    from engine.kernels.quant_matmul import dequantize_int4, dequantize_int8

    n_out = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if accumulate is None:
        out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    else:
        out = accumulate.view(m, n_out)
        assert out.dtype == x.dtype and out.stride(-1) == 1
    if m == 0:
        return out.view(*x.shape[:-1], n_out)
    group = k // scales.shape[1] if bits == 4 else None
    cfg = config or tile_config(m, n_out, k, bits, group)
    if cfg.kernel == "dequant" or (bits == 8 and k % 4) or not qweight.is_contiguous():
        w = dequantize_int4(qweight, scales) if bits == 4 else dequantize_int8(qweight, scales)
        y = F.linear(x, w.to(x.dtype), bias)
        return y if accumulate is None else accumulate.add_(y)
    assert scales.stride(-1) == 1
    words = qweight.view(torch.int32)  # [N, K/8] (int4) or [N, K/4] (int8), little-endian
    bias_arg = bias if bias is not None else out
    if cfg.kernel == "gemv_h2":
        if gemv_h2_supported(x2, scales, bits):
            steps = gemv_h2_steps(k, scales, bits)
            split, per_split = _split(triton.cdiv(n_out, cfg.block_n) * m, steps, cfg, x.device)
            gemv_h2(x2, words, scales, bias, out, cfg.block_n, cfg.num_warps, split, per_split, bits=bits,
                    accumulate=accumulate is not None, depth=cfg.prefetch if cfg.prefetch in RING_DEPTHS else 2)
            return out.view(*x.shape[:-1], n_out)
        cfg = replace(cfg, kernel="gemv")
    if cfg.kernel == "mma":
        if bits == 4 and mma_supported(x2, scales):
            tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, cfg.block_m)
            split, per_split = _split(tiles, k // group, cfg, x.device)
            int4_mma(x2, words, scales, bias, out, cfg, split, per_split, accumulate=accumulate is not None)
            return out.view(*x.shape[:-1], n_out)
        cfg = replace(cfg, kernel="dot")
    if cfg.kernel == "gemv":
        block_m = min(cfg.block_m, 4)
        if bits == 4:
            word_step = group // 8  # one quantization group a step
        else:
            word_step = 1 << ((min(cfg.block_k, k) // 4).bit_length() - 1)
            while k % (4 * word_step):  # a power of two words dividing the row
                word_step //= 2
        steps = k // (word_step * (32 // bits))
        tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, block_m)
        split, per_split = _split(tiles, steps, cfg, x.device)
        grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, block_m), split)
        part, locks = split_scratch(out, split, tiles, words)
        _gemv_kernel[grid](
            x2, words, scales, bias_arg, out, part, locks, m, n_out, steps, per_split, MAGIC7,
            x2.stride(0), words.stride(0), scales.stride(0) if bits == 4 else 0, out.stride(0),
            BITS=bits, WORDS=word_step, BLOCK_M=block_m, BLOCK_N=cfg.block_n, SPLIT=split > 1,
            HAS_BIAS=bias is not None, ACCUMULATE=accumulate is not None, PREFETCH=cfg.prefetch,
            num_warps=cfg.num_warps, num_stages=1,
            **pdl_launch(x.device, early_trigger=False),
        )
        return out.view(*x.shape[:-1], n_out)

    tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_BIAS=bias is not None,
                  ACCUMULATE=accumulate is not None,
                  PREC=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **pdl_launch(x.device, early_trigger=False))
    grid_mn = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m))
    if bits == 4:
        steps = k // group
        # Many rows: gather x into the kernel's column order once (one small launch) instead of
        # element by element in every program.
        permute = m >= PERMUTE_X_MIN_M
        if permute:
            x2 = x2.index_select(1, _dot_order(k, group, x.device))
        split, per_split = _split(tiles, steps, cfg, x.device)
        part, locks = split_scratch(out, split, tiles, words)
        _int4_dot_kernel[grid_mn + (split,)](
            x2, words, scales, bias_arg, out, part, locks, m, n_out, steps, per_split,
            _MAGIC2.get(x.dtype, 0), x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, MAGIC=_MAGIC.get(x.dtype, 0), SPLIT=split > 1, PREFETCH=cfg.prefetch,
            X_PERMUTED=permute, **common,
        )
    else:
        block_k = cfg.block_k
        steps = triton.cdiv(k, block_k)
        split, per_split = _split(tiles, steps, cfg, x.device)
        part, locks = split_scratch(out, split, tiles, words)
        _int8_dot_kernel[grid_mn + (split,)](
            x2, qweight, scales, bias_arg, out, part, locks, m, n_out, k, per_split * block_k,
            x2.stride(0), qweight.stride(0), out.stride(0),
            BLOCK_K=block_k, SPLIT=split > 1, **common,
        )
    return out.view(*x.shape[:-1], n_out)
