"""Triton weight-only int8 / int4 matmuls (formats in quant_matmul.py).

One kernel per format covers every M: a program owns a BLOCK_M x BLOCK_N output tile and walks
its share of K, converting weight codes to the activation dtype in registers and feeding the
tensor cores (tl.dot). For decode (M <= 16) BLOCK_M is 16 and, when the N tiles alone cannot
fill the GPU, K is split across programs whose fp32 partials a second small kernel sums; so the
packed weights are read exactly once per call. int4 scales are applied once per group after
the group's dot, and code offsets are folded in with the row sums of x:
    sum_k x_k (c_k - 8) s = s * (dot(x, MAGIC + c) - (MAGIC + 8) * sum_k x_k),
where MAGIC + c is built by bit operations (see _codes_as).
From DEQUANT_MIN_M rows on, the weight is dequantized once and cuBLAS does the matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels._triton_util import num_sms

DEQUANT_MIN_M = 1024
# Float whose mantissa's last bit is worth 1, per activation dtype (see _codes_as).
_MAGIC = {torch.float16: 1024, torch.bfloat16: 128}
INT8_BLOCK_K = 128  # int8 bytes per row per step


@dataclass(frozen=True)
class TileConfig:
    """Launch shape; the defaults come from tile_config(), benchmarks may override."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int | None = None  # None: chosen from the SM count


def tile_config(m: int) -> TileConfig:
    """Decode-sized M gets thin, deep-pipelined tiles; larger M square-ish tensor-core tiles."""
    if m <= 16:
        return TileConfig(16, 64, 4, 4)
    if m <= 64:
        return TileConfig(64, 64, 4, 3)
    return TileConfig(128, 128, 8, 3)


@triton.jit
def _codes_as(c, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """4-bit codes c (0..15) as `dtype` values MAGIC + c.

    For 16-bit floats the code is OR-ed into the mantissa of MAGIC (1024 in fp16, 128 in bf16,
    where the mantissa's last bit is worth 1): bit operations instead of int-to-float
    conversions, whose throughput would cap a decode GEMV below memory speed. The caller removes
    MAGIC with the row sums of x. fp32 (MAGIC = 0) converts plainly.
    """
    if MAGIC == 1024:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    elif MAGIC == 128:
        return (c.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        return c.to(dtype)


@triton.jit
def _int4_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, num_groups, groups_per_split,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, UNROLL: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, HALF)
    n_ok = n < N
    m_ok = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn + j[None, :]  # [BLOCK_N, HALF]
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm + j[None, :]  # [BLOCK_M, HALF]
    s_rows = s_ptr + n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    g_begin = pid_k * groups_per_split
    # groups_per_split and num_groups are multiples of UNROLL: no tail masks on K.
    for g0 in range(g_begin, tl.minimum(g_begin + groups_per_split, num_groups), UNROLL):
        for u in tl.static_range(UNROLL):
            g = g0 + u
            b = tl.load(w_rows + g * HALF, mask=n_ok[:, None], other=0)
            x_lo = tl.load(x_rows + g * GROUP, mask=m_ok[:, None], other=0.0)
            x_hi = tl.load(x_rows + g * GROUP + HALF, mask=m_ok[:, None], other=0.0)
            s = tl.load(s_rows + g, mask=n_ok, other=0.0).to(tl.float32)
            lo = _codes_as(b & 15, x_lo.dtype, MAGIC)
            hi = _codes_as(b >> 4, x_lo.dtype, MAGIC)
            d = tl.dot(x_lo, tl.trans(lo)) + tl.dot(x_hi, tl.trans(hi))  # [BLOCK_M, BLOCK_N]
            x_sum = tl.sum(x_lo.to(tl.float32), 1) + tl.sum(x_hi.to(tl.float32), 1)
            acc += (d - (MAGIC + 8.0) * x_sum[:, None]) * s[None, :]
    _epilogue(acc, bias_ptr, out_ptr, part_ptr, m, n, M, N, stride_om, pid_k, SPLIT, HAS_BIAS)


@triton.jit
def _int8_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
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
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    s = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * s[None, :]  # per-channel scale commutes with the K sum
    _epilogue(acc, bias_ptr, out_ptr, part_ptr, m, n, M, N, stride_om, pid_k, SPLIT, HAS_BIAS)


@triton.jit
def _epilogue(acc, bias_ptr, out_ptr, part_ptr, m, n, M, N, stride_om, pid_k,
              SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask = (m < M)[:, None] & (n < N)[None, :]
    if SPLIT:
        # fp32 partials [split, M, N]; the bias is added once, by the merge.
        dst = part_ptr + (pid_k * M + m.to(tl.int64))[:, None] * N + n[None, :]
        tl.store(dst, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om,
                         SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):  # fixed order: deterministic sums
        acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _split_k(tiles: int, k_steps: int, device: torch.device, requested: int | None) -> int:
    """Split K only when the output tiles leave SMs idle; aim for ~2 programs per SM."""
    if requested is not None:
        return max(1, min(requested, k_steps))
    sms = num_sms(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), k_steps, 16))


def quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [..., K] times the quantized W [N, K] transposed -> [..., N] in x's dtype."""
    from engine.kernels.quant_matmul import dequantize_int4, dequantize_int8

    n_out = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    if m == 0:
        return out.view(*x.shape[:-1], n_out)
    if m >= DEQUANT_MIN_M and config is None:
        w = dequantize_int4(qweight, scales) if bits == 4 else dequantize_int8(qweight, scales)
        return F.linear(x, w.to(x.dtype), bias)
    assert qweight.is_contiguous() and scales.stride(-1) == 1
    cfg = config or tile_config(m)
    tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    if bits == 4:
        groups = scales.shape[1]
        group = k // groups
        unroll = 128 // group if groups % max(128 // group, 1) == 0 else 1  # >= 64 bytes a row per step
        steps = groups // unroll
    else:
        steps = triton.cdiv(k, INT8_BLOCK_K)
    split = _split_k(tiles, steps, x.device, cfg.split_k)
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    part = torch.empty(split, m, n_out, device=x.device, dtype=torch.float32) if split > 1 else out
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split > 1, HAS_BIAS=bias is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if bits == 4:
        _int4_kernel[grid](
            x2, qweight, scales, bias_arg, out, part, m, n_out, groups, per_split * unroll,
            x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, UNROLL=unroll, MAGIC=_MAGIC.get(x.dtype, 0), **common,
        )
    else:
        _int8_kernel[grid](
            x2, qweight, scales, bias_arg, out, part, m, n_out, k, per_split * INT8_BLOCK_K,
            x2.stride(0), qweight.stride(0), out.stride(0),
            BLOCK_K=INT8_BLOCK_K, **common,
        )
    if split > 1:
        block = min(1024, triton.next_power_of_2(n_out))
        _merge_splits_kernel[(m, triton.cdiv(n_out, block))](
            part, bias_arg, out, m, n_out, out.stride(0),
            SPLITS=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return out.view(*x.shape[:-1], n_out)
