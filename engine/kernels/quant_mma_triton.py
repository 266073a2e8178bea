"""Triton int4 (group-wise) weight-only matmul on tensor cores for 2..64 activation rows ("mma").

Why a second tensor-core kernel: the "dot" kernel (quant_matmul_triton.py) unpacks a group's
words in registers with join / permute, so its W tile reaches tl.dot through a layout change:
a trip through shared memory with barriers every group, and its weight loads are not staged by
Triton's software pipeliner (they feed the dot through that shape change). It streams ~0.5-0.8
TB/s at M = 4-16. Here the loaded tile keeps its shape up to the matrix unit:

- Planes. A group of G columns is G/4 bits a row: read it as 16 elements of E = G/4 bits (one
  32-bit word each for G = 128, a 16-bit half for 64, a byte for 32), i.e. a [BLOCK_N, 16]
  tile. Its P = E/4 = G/16 nibble planes (plane d = bits 4d .. 4d + 3 of every element) are
  P [BLOCK_N, 16] operands, each obtained from the same loaded tile by a shift and a mask, so
  tl.dot consumes the load through elementwise operations only. The pipeliner then stages the
  packed tile itself with cp.async (num_stages buffers in shared memory), and the unpacking
  happens after the shared -> register load, in the dot operand's own layout: no convert_layout.
- Columns. With the word-planar packing of quant_matmul.py, element p of plane d is group
  column (P (p mod 32/E) + d) G/8 + p div (32/E). For G = 128 (E = 32) that is d * 16 + p: the
  activations of plane d are the 16 consecutive columns 16 d .. 16 d + 15, loaded as they are.
  For G = 64 / 32 the launcher gathers x into that order once per call (mma_order()).
- Scales: one per (row, group); every group is P dots of K = 16 into a fresh fp32 tile, which
  is multiplied by the group's scales and added to the accumulator. The scale load feeds no
  tl.dot, so the pipeliner leaves it alone: a one-step register ring (group g + 1 requested
  while group g computes) hides its latency; a deeper ring would stop the pipeliner (it skips
  loops whose carried values live two iterations). On the GPU it is an inline-asm load, whose
  layout follows its pointers (a tl.load would be given a row-major layout by the coalescer and
  converted through shared memory every group).
- Unpacking (G = 128, fp16 / bf16, on the GPU): inline PTX per two words (the two consecutive
  K elements a thread holds in the operand layout): two PRMT interleave their 16-bit halves,
  then per plane pair one shift and one LOP3 make the fp16x2 / bf16x2 pair MAGIC + c (MAGIC =
  1024 / 128, the value whose mantissa's last bit is worth 1) and one exact FMA subtracts
  MAGIC + 8. Elsewhere (interpreter, fp32, G < 128) the same arithmetic in Triton operations.
- Orientation: W is tl.dot's B operand (mma.sync, out = x W^T) or, with W_IS_A, the A operand
  (out^T = W x^T; Hopper's wgmma reads A from registers, BLOCK_N must be >= 16 x num_warps).
- Split-K and its one-launch reduction are shared with the other kernels (quant_split_triton.py).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET, dot_precision, pdl_launch, wait_for_inputs
from engine.kernels.quant_gemv_h2_triton import _load_scales
from engine.kernels.quant_split_triton import split_fixup, split_scratch, store_rows

PLANE_K = 16  # elements a plane contributes to one dot (tl.dot's smallest K)
_PLANE_K = tl.constexpr(PLANE_K)

# Plane constants per activation dtype: (MAGIC bits twice, 1.0 twice, -(MAGIC + 8) twice, PTX type).
_PTX_TYPES = {torch.bfloat16: ("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"),
              torch.float16: ("0x64006400", "0x3C003C00", "0xE408E408", "f16x2")}


def _unpack32_asm(magic: str, one: str, off: str, ptx_type: str) -> str:
    """PTX: two words ($8, $9) -> eight registers, plane d's (word 0, word 1) pair in $d."""
    lines = ["prmt.b32 a, $8, $9, 0x5410;", "prmt.b32 b, $8, $9, 0x7632;"]  # low halves, high halves
    for h, src in enumerate("ab"):
        for d in range(4):
            o = 4 * h + d
            if d:
                lines.append(f"shr.b32 t, {src}, {4 * d};")
            lines.append(f"lop3.b32 ${o}, {'t' if d else src}, 0x000F000F, mg, 0xEA;")  # (v & mask) | mg
            lines.append(f"fma.rn.{ptx_type} ${o}, ${o}, one, off;")  # MAGIC + c - (MAGIC + 8), exact
    head = f"{{ .reg .b32 a, b, t, mg, one, off; mov.b32 mg, {magic}; mov.b32 one, {one}; mov.b32 off, {off};"
    return "\n".join([head] + lines + ["}"])


UNPACK32_BF16 = tl.constexpr(_unpack32_asm(*_PTX_TYPES[torch.bfloat16]))
UNPACK32_FP16 = tl.constexpr(_unpack32_asm(*_PTX_TYPES[torch.float16]))
SCALE_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton.jit
def _plane(t, D: tl.constexpr, dtype: tl.constexpr):
    """Plane D of an element tile as `dtype` values c - 8 (Triton operations)."""
    c = (t >> (4 * D)) & 15
    if dtype == tl.bfloat16:
        return (c.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    elif dtype == tl.float16:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    else:
        return c.to(dtype) - 8.0


@triton.jit
def _planes(t, P: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr):
    """The P planes of an element tile, a tuple of tiles of `dtype` values c - 8."""
    if ASM:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(UNPACK32_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [t],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(UNPACK32_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [t],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    elif P == 8:
        return (_plane(t, 0, dtype), _plane(t, 1, dtype), _plane(t, 2, dtype), _plane(t, 3, dtype),
                _plane(t, 4, dtype), _plane(t, 5, dtype), _plane(t, 6, dtype), _plane(t, 7, dtype))
    elif P == 4:
        return (_plane(t, 0, dtype), _plane(t, 1, dtype), _plane(t, 2, dtype), _plane(t, 3, dtype))
    else:
        return (_plane(t, 0, dtype), _plane(t, 1, dtype))


@triton.jit
def _int4_mma_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, groups, groups_per_split,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, W_IS_A: tl.constexpr, ASM: tl.constexpr,
    SKIND: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    P: tl.constexpr = GROUP // _PLANE_K  # nibble planes an element holds
    EW: tl.constexpr = 128 // GROUP  # elements a 32-bit word holds
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    # Rows past N read row N - 1 (no masks on the staged loads); the stores drop them.
    rows = tl.minimum(n, N - 1).to(tl.int64)
    e = tl.arange(0, _PLANE_K)
    if EW == 1:
        w_base = w_ptr
    elif EW == 2:
        w_base = w_ptr.to(tl.pointer_type(tl.int16))
    else:
        w_base = w_ptr.to(tl.pointer_type(tl.int8))
    w_ptrs = w_base + rows[:, None] * (stride_wn * EW) + e[None, :]  # [BLOCK_N, 16] elements of group 0
    x_ptrs = x_ptr + m.to(tl.int64)[:, None] * stride_xm + e[None, :]  # [BLOCK_M, 16] columns of plane 0
    s_ptrs = s_ptr + rows * stride_sn
    first = pid_k * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    if W_IS_A:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s_next = _load_scales(s_ptrs + first, SKIND, EMULATE)
    wait_for_inputs(PDL)
    for g in range(first, last):
        sv = s_next
        s_next = _load_scales(s_ptrs + tl.minimum(g + 1, last - 1), SKIND, EMULATE)
        t = tl.load(w_ptrs + g * _PLANE_K)  # [BLOCK_N, 16] packed elements, staged by the pipeliner
        xg = x_ptrs + g * GROUP
        planes = _planes(t, P, x_ptr.dtype.element_ty, ASM)
        part = tl.zeros_like(acc)
        for d in tl.static_range(P):
            xd = tl.load(xg + d * _PLANE_K, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, 16]
            if W_IS_A:
                part = tl.dot(planes[d], tl.trans(xd), part, input_precision=PREC)
            else:
                part = tl.dot(xd, tl.trans(planes[d]), part, input_precision=PREC)
        if W_IS_A:
            acc += part * sv[:, None]
        else:
            acc += part * sv[None, :]
    if W_IS_A:
        acc = tl.trans(acc)
    store_rows(acc, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)


@functools.cache
def mma_order(k: int, group: int, device: torch.device) -> torch.Tensor:
    """Column of x at each position of the mma kernel's K order (the identity for G = 128)."""
    planes, per_word, wpg = group // PLANE_K, 128 // group, group // 8
    q = torch.arange(group, device=device)  # built on the device: no host copy inside a graph capture
    d, p = q // PLANE_K, q % PLANE_K
    col = (planes * (p % per_word) + d) * wpg + p // per_word
    return (torch.arange(0, k, group, device=device)[:, None] + col[None, :]).reshape(-1)


def mma_supported(x2: torch.Tensor, scales: torch.Tensor) -> bool:
    """Shapes and dtypes the mma kernel takes (else the caller uses the "dot" kernel)."""
    k = x2.shape[1]
    group = k // scales.shape[1]
    return group in (32, 64, 128) and x2.dtype in SCALE_KIND and scales.dtype in SCALE_KIND


def int4_mma(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
             out: torch.Tensor, cfg, split: int, per_split: int, accumulate: bool = False) -> None:
    """out [M, N] = x2 [M, K] @ dequant(W).T (+ bias) (+ out with accumulate), W as int32 words
    [N, K/8], split K ways."""
    m, k = x2.shape
    n_out = words.shape[0]
    group = k // scales.shape[1]
    if group != 128:
        x2 = x2.index_select(1, mma_order(k, group, x2.device))
    tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    part, locks = split_scratch(out, split, tiles, words)
    asm = not INTERPRET and group == 128 and x2.dtype in _PTX_TYPES
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _int4_mma_kernel[grid](
        x2, words, scales, bias if bias is not None else out, out, part, locks,
        m, n_out, k // group, per_split, x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, PREC=dot_precision(x2.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split > 1,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, W_IS_A=cfg.w_is_a, ASM=asm, SKIND=SCALE_KIND[scales.dtype],
        EMULATE=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_launch(x2.device, early_trigger=False),
    )
