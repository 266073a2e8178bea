"""Weight-only int8 / int4 matmuls: y = x @ dequant(W).T (+ bias), x in fp16/bf16/fp32.

Formats (W is [N, K] like nn.Linear.weight: N output features, K input features):

int8, per output channel, symmetric:
    qweight int8 [N, K], scales [N] (floating);   W[n, k] = qweight[n, k] * scales[n]
    quantized as round(W / s) clamped to [-127, 127] with s = max_k |W[n, k]| / 127.

int4, group-wise along K, symmetric, group size G in {32, 64, 128} (K % G == 0):
    qweight uint8 [N, K // 2], scales [N, K // G] (floating)
    Each code c in [0, 15] stands for c - 8. Read a row of qweight as little-endian 32-bit
    words (8 codes each): group g is the G/8 words g*G/8 .. g*G/8 + G/8 - 1, and nibble i
    (bits 4i .. 4i+3, i < 8) of the group's word w holds column g*G + i*(G/8) + w. In bytes:
    byte 4w + j of the group holds nibble 2j in its low half and nibble 2j + 1 in its high half.
        W[n, g*G + i*(G/8) + w] = (((word[n, g*G/8 + w] >> 4i) & 15) - 8) * scales[n, g]
    quantized as round(W / s) clamped to [-8, 7] with s = max over the group of |W| / 7.
    Why this order: a kernel's 16-byte load brings 4 words of one row, i.e. 32 codes that lie in
    8 runs of 4 consecutive columns, so the matching activations are 8 short vector loads; each
    nibble is converted in place (mask, no shift, for nibbles 0..4), and a group's nibbles in
    (i, w) order are the group's columns in order, which is what a matrix-unit kernel needs.
    Rows are independent: stacking two layers' qweight/scales along dim 0 stacks their outputs.

Scales are stored in the model's floating dtype; all products accumulate in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels._dispatch import use_triton

INT4_GROUP_SIZES = (32, 64, 128)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per-channel int8: W [N, K] -> (qweight int8 [N, K], scales [N] in scale_dtype).

    Codes are rounded against the scales as stored (after the cast to scale_dtype).
    """
    w = w.float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 codes and per-channel scales -> W [N, K] in dtype (exact in float32; in a narrower
    dtype each weight is rounded once)."""
    return qweight.to(dtype).mul_(scales.to(dtype)[:, None])


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise int4: W [N, K] -> (qweight uint8 [N, K/2], scales [N, K/G] in scale_dtype).

    Codes are rounded against the scales as stored (after the cast to scale_dtype).
    """
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    wg = w.float().reshape(n, k // group_size, group_size)
    scales = (wg.abs().amax(dim=-1).clamp(min=1e-8) / 7.0).to(scale_dtype)  # [N, K/G]
    codes = (torch.round(wg / scales.float()[..., None]).clamp(-8, 7) + 8).to(torch.uint8)  # [N, K/G, G]
    return pack_int4(codes.reshape(n, k), group_size), scales


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 (column order) -> the packed qweight uint8 [N, K/2] described above."""
    n, k = codes.shape
    # Column i*(G/8) + w of a group -> nibble i of word w; byte j of a word = nibbles 2j, 2j + 1.
    planes = codes.reshape(n, k // group_size, 8, group_size // 8)  # [N, K/G, i, w]
    packed = planes[:, :, 0::2, :] | (planes[:, :, 1::2, :] << 4)  # [N, K/G, j, w]
    return packed.transpose(-1, -2).reshape(n, k // 2).contiguous()


def unpack_int4(qweight: torch.Tensor, groups: int) -> torch.Tensor:
    """The packed qweight uint8 [N, K/2] of `groups` groups a row -> its codes uint8 [N, K] in
    column order (0..15; the inverse of pack_int4)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    words = k // groups // 8
    b = qweight.reshape(n, groups, words, 4)  # [N, K/G, w, j]
    nibbles = torch.stack((b & 15, b >> 4), dim=-1).reshape(n, groups, words, 8)  # [.., w, i]
    return nibbles.transpose(-1, -2).reshape(n, k)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed int4 codes and group scales -> W [N, K] in dtype (exact in float32; in a narrower
    dtype each weight is rounded once)."""
    n, groups = scales.shape
    codes = unpack_int4(qweight, groups).reshape(n, groups, -1).to(dtype).sub_(8.0)  # [N, K/G, G]
    return codes.mul_(scales.to(dtype)[..., None]).reshape(n, -1)


def _linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                accumulate: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ bias) in fp32, returned in x's dtype, or added into `accumulate` (rounded once)."""
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    if accumulate is None:
        return y.to(x.dtype)
    return accumulate.copy_(accumulate.float() + y)


def int8_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(W).T in fp32, returned in x's dtype (or added into `accumulate` [..., N])."""
    return _linear_ref(x, dequantize_int8(qweight, scales), bias, accumulate)


def int4_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(W).T in fp32, returned in x's dtype (or added into `accumulate` [..., N])."""
    return _linear_ref(x, dequantize_int4(qweight, scales), bias, accumulate)


def int8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int8 linear: Triton on CUDA, torch's packed kernel on the CPU (quant_matmul_cpu.py),
    the reference elsewhere and for what those do not take. With `accumulate` (x's
    dtype, [..., N]) the product is added into that tensor in place, which is returned."""
    if use_triton(x, qweight):
        from engine.kernels.quant_matmul_triton import quant_matmul_triton

        return quant_matmul_triton(x, qweight, scales, bias, bits=8, accumulate=accumulate)
    from engine.kernels import quant_matmul_cpu as cpu

    if cpu.int8_cpu_ok(x, qweight, bias, accumulate):
        return cpu.int8_matmul_cpu(x, qweight, scales)
    return int8_matmul_ref(x, qweight, scales, bias, accumulate)


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4 linear: Triton on CUDA, torch's packed kernel on the CPU, the reference
    elsewhere (as int8_matmul; `accumulate` as there)."""
    if use_triton(x, qweight):
        from engine.kernels.quant_matmul_triton import quant_matmul_triton

        return quant_matmul_triton(x, qweight, scales, bias, bits=4, accumulate=accumulate)
    from engine.kernels import quant_matmul_cpu as cpu

    if cpu.int4_cpu_ok(x, qweight, bias, accumulate):
        return cpu.int4_matmul_cpu(x, qweight, scales)
    return int4_matmul_ref(x, qweight, scales, bias, accumulate)
