"""Weight-only int8 / int4 matmuls on the CPU through torch's own packed CPU kernels.

The references in quant_matmul.py dequantize the whole weight to fp32 on every call: right for
checking, ruinous for serving (a 2048 x 8192 int4 layer: about 120 ms a decode token on one core,
against 0.9 ms here). torch ships CPU kernels for exactly these formats:

  int8, per output channel: `aten._weight_int8pack_mm(x, qweight [N, K] int8, scales [N])` reads
      Ember's int8 layout as it is (scales in x's dtype; a weight not 64-byte aligned, as one
      mapped from a safetensors file can be, is copied once: the kernel crashes on it);
  int4, group-wise: `aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)` with
      W[n, k] = (code - 8) * scale + zero; Ember's codes (c stands for c - 8, no zero points) are
      unpacked once per layer, repacked by `aten._convert_weight_to_int4pack_for_cpu`
      (N must be a multiple of 16) and kept beside the layer's qweight (`int4_cpu_pack`).

Both accumulate in fp32 and return x's dtype (one rounding, as the references). They work a row
at a time, so from INT8_DENSE_MIN_ROWS / INT4_DENSE_MIN_ROWS rows on (prefill chunks) the weight
is instead dequantized once to x's dtype and multiplied densely: exact in fp32; in bf16 each weight is rounded to bf16
(about 2^-9 relative), an error of the size of the output's own rounding. Layers with a bias or
an `accumulate` target (the folded-norm path, CUDA only by default) keep the references, whose
rounding they specify. Measured against the references and dense nn.Linear by
benchmarks/bench_quant_cpu.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from engine.kernels.quant_matmul import dequantize_int4, dequantize_int8, unpack_int4


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether this torch build has the packed CPU kernels (checked once)."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in
               ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


# torch's kernels work row by row: from this many rows on, dequantizing the weight once to the
# activations' dtype and running a dense matmul is faster (benchmarks/results/quant-cpu.json, bf16,
# 2048 x 8192: int8 at 64 rows 30.3 ms against 35.0; int4 at 256 rows 66 ms against 100; the
# int4 dequantization, about 40 ms for 16M weights, costs more than the int8 one).
INT8_DENSE_MIN_ROWS = 64
INT4_DENSE_MIN_ROWS = 256


def _cpu_ok(x: torch.Tensor, bias, accumulate) -> bool:
    return (x.device.type == "cpu" and bias is None and accumulate is None
            and x.dtype in (torch.float32, torch.bfloat16) and cpu_kernels_available())


def int8_cpu_ok(x: torch.Tensor, qweight: torch.Tensor, bias, accumulate) -> bool:
    """Whether int8_matmul_cpu takes this call (else the reference)."""
    return _cpu_ok(x, bias, accumulate)


def int4_packable(qweight: torch.Tensor) -> bool:
    """torch's CPU int4 packing needs the output features N a multiple of 16."""
    return qweight.shape[0] % 16 == 0


def int4_cpu_ok(x: torch.Tensor, qweight: torch.Tensor, bias, accumulate) -> bool:
    """Whether int4_matmul_cpu takes this call (else the reference)."""
    return _cpu_ok(x, bias, accumulate) and int4_packable(qweight)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


# torch's allocator aligns CPU tensors to 64 bytes; a weight read straight from a memory-mapped
# safetensors file may not be, and the int8 kernel crashes (segfault) on such a weight.
ALIGNMENT = 64

# unaligned qweight -> ((its data pointer, version), an aligned copy); an entry goes with its qweight.
_aligned: WeakIdKeyDictionary = WeakIdKeyDictionary()


def aligned_int8_weight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight itself when 64-byte aligned and contiguous, else a cached aligned copy."""
    if qweight.data_ptr() % ALIGNMENT == 0 and qweight.is_contiguous():
        return qweight
    key = (qweight.data_ptr(), qweight._version)
    cached_key, copy = _aligned.get(qweight, (None, None))
    if cached_key != key:
        copy = qweight.contiguous().clone()
        _aligned[qweight] = (key, copy)
    return copy


def int8_matmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (qweight * scales[:, None]).T -> [..., N] in x's dtype."""
    if _rows(x) >= INT8_DENSE_MIN_ROWS:
        return F.linear(x, dequantize_int8(qweight, scales, x.dtype))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, aligned_int8_weight(qweight), scales.to(x.dtype))
    return y.reshape(*x.shape[:-1], qweight.shape[0])


class Int4CpuPack(NamedTuple):
    packed: torch.Tensor  # torch's CPU int4 layout
    scale_zeros: torch.Tensor  # [K/G, N, 2]: (scale, 0), in the activations' dtype
    group_size: int
    key: tuple  # what it was built from (see int4_cpu_pack)


# qweight -> its packs by activation dtype; an entry goes with its qweight.
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()


def int4_cpu_pack(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> Int4CpuPack:
    """torch's CPU layout of an Ember int4 layer, built on first use and rebuilt when qweight or
    scales change (another tensor, or written in place: torch's version counters)."""
    key = (qweight.data_ptr(), scales.data_ptr(), qweight._version, scales._version)
    per_dtype = _packs.setdefault(qweight, {})
    pack = per_dtype.get(dtype)
    if pack is None or pack.key != key:
        n, groups = scales.shape
        codes = unpack_int4(qweight, groups).to(torch.int32)  # [N, K], 0..15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
        s = scales.t().to(dtype)
        pack = Int4CpuPack(packed, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous(),
                           qweight.shape[1] * 2 // groups, key)
        per_dtype[dtype] = pack
    return pack


def int4_matmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(W).T -> [..., N] in x's dtype (see the module docstring)."""
    if _rows(x) >= INT4_DENSE_MIN_ROWS:
        return F.linear(x, dequantize_int4(qweight, scales, x.dtype))
    pack = int4_cpu_pack(qweight, scales, x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, pack.packed, pack.group_size, pack.scale_zeros)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
