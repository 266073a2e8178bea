"""Triton int4 GEMV on packed halves ("gemv_h2"), for the int4 format of quant_matmul.py.

Why: the fp32 GEMV (quant_gemv_triton.py) spends three instructions a code (LOP3, FADD, FFMA),
~8.7 thread-instructions a weight byte, and is issue-bound at ~40% of copy bandwidth. Here every
instruction on codes handles two of them as an fp16x2 pair:

- Nibble i of a word sits at bits 4i. One LOP3 (mask 0x000F000F, OR 0x6400 into both halves)
  gives fp16x2 (1024 + c_0, 1024 + c_4); mask 0x00F000F0 gives (1024 + 16 c_1, 1024 + 16 c_5);
  one shift by 8 serves nibbles (2, 6) and (3, 7) the same way. One exact HADD2 (-1032) or
  HFMA2 (x 1/16, -72) leaves (c - 8, c' - 8). Per word: 1 SHF, 4 LOP3, 4 HADD2/HFMA2 and 4 HFMA2
  with the matching activation pairs, 13 instructions for 8 codes (the fp32 GEMV: 24).
- Activations: the pair for nibbles (i, i + 4) of group word w is group columns (i W + w,
  (i + 4) W + w), W = G / 8. A thread reads them as 32-bit words (two 16-bit columns), widens
  and scales them in fp32 and packs fp16x2 pairs (cvt.rn.f16x2.f32), once a step, for all the
  W rows it holds: wide tiles (8 rows a thread) amortize this.
- A thread holds 4 consecutive words of a row (one 16-byte load): their 32 products accumulate
  in one fp16x2 register whose halves are then added (fp16), widened, and folded into an fp32
  accumulator with the group scale (one FFMA): 55 instructions per 16 weight bytes.
- Range: before its K loop a program takes max |x| over its K slice of the activation row and
  scales the row by an exact power of two, 2^-e, so the largest |x| 2^-e lies in [0.5, 1); the
  fp32 result is multiplied by 2^e at the end. With |c - 8| <= 8 a 32-product fp16 partial
  stays below 256 (fp16 overflows at 65504) whatever the activations' range.
- Error: bf16 / fp16 activations convert to fp16 exactly unless they fall below 2^-14 of the
  slice maximum (fp16 subnormals: absolute error <= 2^-25 of the maximum); each product and
  partial sum rounds at 2^-11 of the 32-product partial. These errors are independent across
  partials and add in quadrature in fp32: on random data the output is off by ~6e-4 of its
  largest value (tested at <= 1.5e-3, against bf16's own output rounding of up to 2e-3).
  Outlier activations (one column 1e4 x the rest) lose precision only in the slice that holds
  them, relative to that slice's largest products, which dominate the output anyway.
- Skeleton as in quant_gemv_triton.py: BLOCK_N rows of W, one activation row, a K slice per
  program; a two-step register ring of weights and scales; split-K partials reduced in the same
  launch (quant_split_triton.py). Loads are unmasked (clamped addresses) and the loop is
  unrolled by 3 so the ring rotates without register moves.
- The PTX cannot run under TRITON_INTERPRET. EMULATE=True swaps the three PTX blocks for Triton
  integer / fp16 operations with the same pairing and roundings (up to fp16 FMA rounding once
  through fp32), so CPU tests run the kernel's indexing, pre-pass, ring and split-K;
  emulate_gemv_h2() repeats the arithmetic in torch for shapes too large for the interpreter.
  The launcher in quant_matmul_triton.py selects this kernel only for CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET
from engine.kernels.quant_split_triton import split_fixup, split_locks, store_rows

PRE_COLS = 2048  # activation columns per iteration of the max-abs pre-pass
UNROLL = 3  # with a two-step ring, 3 copies of the loop body rotate its registers in place
_XKIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _dot4_asm() -> str:
    """PTX: 4 words ($1..$4) and their 16 fp16x2 activation pairs ($5 + 4 j + i: word j, nibble
    pair i) -> the fp32 sum of the 32 products (c - 8) x, accumulated in fp16x2."""
    lines = [
        "{",
        ".reg .b32 s, a, b, c, d, p, kmag, kone, k16, k72;",
        ".reg .f16 lo, hi;",
        "mov.b32 kmag, 0x64006400;",  # 1024 in both halves
        "mov.b32 kone, 0xE408E408;",  # -1032: (1024 + c) - 1032 = c - 8
        "mov.b32 k16, 0x2C002C00;",  # 1/16: (1024 + 16 c) / 16 - 72 = c - 8
        "mov.b32 k72, 0xD480D480;",  # -72
    ]
    for j in range(4):
        w = f"${1 + j}"
        x = [f"${5 + 4 * j + i}" for i in range(4)]
        lines += [
            f"shr.b32 s, {w}, 8;",
            f"lop3.b32 a, {w}, 0x000F000F, kmag, 0xEA;",  # 0xEA: (a & b) | c
            f"lop3.b32 b, {w}, 0x00F000F0, kmag, 0xEA;",
            "lop3.b32 c, s, 0x000F000F, kmag, 0xEA;",
            "lop3.b32 d, s, 0x00F000F0, kmag, 0xEA;",
            "add.rn.f16x2 a, a, kone;",
            "fma.rn.f16x2 b, b, k16, k72;",
            "add.rn.f16x2 c, c, kone;",
            "fma.rn.f16x2 d, d, k16, k72;",
            f"mul.rn.f16x2 p, a, {x[0]};" if j == 0 else f"fma.rn.f16x2 p, a, {x[0]}, p;",
            f"fma.rn.f16x2 p, b, {x[1]}, p;",
            f"fma.rn.f16x2 p, c, {x[2]}, p;",
            f"fma.rn.f16x2 p, d, {x[3]}, p;",
        ]
    lines += ["mov.b32 {lo, hi}, p;", "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $0, lo;", "}"]
    return "\n".join(lines)


def _widen_asm(dtype: str) -> str:
    """PTX: two 32-bit words of 16-bit activations, $2 = columns (c, c + 1) and $3 = columns
    (c + 4 W, c + 4 W + 1), times the fp32 $4 -> fp16x2 pairs $0 = (col c + 4 W, col c) and
    $1 = (c + 4 W + 1, c + 1), upper half first (bf16 -> fp32 is a shift or a mask; Triton's
    own conversion extracts each high half with a PRMT first)."""
    if dtype == "bf16":
        widen = ["shl.b32 a, $2, 16;", "and.b32 b, $2, 0xFFFF0000;", "shl.b32 c, $3, 16;", "and.b32 d, $3, 0xFFFF0000;"]
    else:
        widen = ["mov.b32 {l0, h0}, $2;", "mov.b32 {l1, h1}, $3;", "cvt.f32.f16 a, l0;", "cvt.f32.f16 b, h0;",
                 "cvt.f32.f16 c, l1;", "cvt.f32.f16 d, h1;"]
    return "\n".join(["{", ".reg .f32 a, b, c, d;", ".reg .f16 l0, h0, l1, h1;"] + widen + [
        "mul.f32 a, a, $4;", "mul.f32 b, b, $4;", "mul.f32 c, c, $4;", "mul.f32 d, d, $4;",
        "cvt.rn.f16x2.f32 $0, c, a;", "cvt.rn.f16x2.f32 $1, d, b;", "}"])


# Group scales, loaded by PTX and widened to fp32 (see _load_scales), per scale dtype.
_SCALE_ASM = {0: "{ .reg .b16 h; ld.global.nc.b16 h, [$1]; mov.b32 $0, {0, h}; }",  # bf16: the high half
              1: "{ .reg .f16 h; ld.global.nc.b16 h, [$1]; cvt.f32.f16 $0, h; }",
              2: "ld.global.nc.f32 $0, [$1];"}
SCALE_BF16 = tl.constexpr(_SCALE_ASM[0])
SCALE_FP16 = tl.constexpr(_SCALE_ASM[1])
SCALE_FP32 = tl.constexpr(_SCALE_ASM[2])
DOT4_ASM = tl.constexpr(_dot4_asm())
DOT4_CONSTRAINTS = tl.constexpr("=f" + ",r" * 20)  # one fp32 out; 4 words and 16 pairs in
WIDEN_BF16 = tl.constexpr(_widen_asm("bf16"))
WIDEN_FP16 = tl.constexpr(_widen_asm("fp16"))


# --- Interpreter stand-ins for the PTX (same pairing, same fp16 roundings) -------------------

@triton.jit
def _half(v, SHIFT: tl.constexpr):
    """The fp16 in the 16 bits at SHIFT of int32 v."""
    return ((v >> SHIFT) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _h2_bits(hi, lo):
    """fp32 hi, lo -> int32 holding the fp16x2 (hi, lo), each rounded to nearest."""
    h = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return (h << 16) | (lo16 & 0xFFFF)


@triton.jit
def _nibbles_emu(p_lo, p_hi, w, x, I: tl.constexpr):
    """p + (c - 8) x for nibbles (I, I + 4) of w against the fp16x2 pair x (fp16 FMA)."""
    c_lo = (((w >> (4 * I)) & 15) - 8).to(tl.float32)
    c_hi = (((w >> (4 * I + 16)) & 15) - 8).to(tl.float32)
    p_lo = (c_lo * _half(x, 0).to(tl.float32) + p_lo.to(tl.float32)).to(tl.float16)
    p_hi = (c_hi * _half(x, 16).to(tl.float32) + p_hi.to(tl.float32)).to(tl.float16)
    return p_lo, p_hi


@triton.jit
def _word_emu(p_lo, p_hi, w, xa, xb, xc, xd):
    p_lo, p_hi = _nibbles_emu(p_lo, p_hi, w, xa, 0)
    p_lo, p_hi = _nibbles_emu(p_lo, p_hi, w, xb, 1)
    p_lo, p_hi = _nibbles_emu(p_lo, p_hi, w, xc, 2)
    return _nibbles_emu(p_lo, p_hi, w, xd, 3)


# --- Building blocks ------------------------------------------------------------------------

@triton.jit
def _quad(t, SHAPE: tl.constexpr):
    """t reshaped to SHAPE (its last dim split as [Q, 2, 2]) -> four [..., Q] tensors: elements
    4 q + j of the last dim for j = 0..3 (no data movement when they sit in one thread)."""
    b0, b1 = tl.split(tl.reshape(t, SHAPE))  # element 4 q + 2 a + b: split b, then a
    t0, t2 = tl.split(b0)
    t1, t3 = tl.split(b1)
    return t0, t1, t2, t3


@triton.jit
def _widen(lo, hi, scale, XKIND: tl.constexpr, EMULATE: tl.constexpr):
    """int32 words of 16-bit activations (see _widen_asm) -> (even, odd) fp16x2 pairs."""
    if EMULATE:
        if XKIND == 0:
            a = (lo << 16).to(tl.float32, bitcast=True)
            b = (lo & -65536).to(tl.float32, bitcast=True)
            c = (hi << 16).to(tl.float32, bitcast=True)
            d = (hi & -65536).to(tl.float32, bitcast=True)
        else:
            a = _half(lo, 0).to(tl.float32)
            b = _half(lo, 16).to(tl.float32)
            c = _half(hi, 0).to(tl.float32)
            d = _half(hi, 16).to(tl.float32)
        return _h2_bits(c * scale, a * scale), _h2_bits(d * scale, b * scale)
    else:
        return tl.inline_asm_elementwise(WIDEN_BF16 if XKIND == 0 else WIDEN_FP16, "=r,=r,r,r,f", [lo, hi, scale],
                                         dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _pairs(xs, scale, I: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, XKIND: tl.constexpr,
           EMULATE: tl.constexpr):
    """fp16x2 activation pairs (columns I W + w, (I + 4) W + w) of the step at xs, scaled by
    2^-e, as four [BLOCK_N, WORDS // 4] tensors for words 4 q + 0..3 (broadcast along rows)."""
    if XKIND == 2:  # fp32 activations: one column a load
        wi = tl.arange(0, WORDS)
        lo = tl.load(xs + I * WORDS + wi) * scale
        hi = tl.load(xs + (I + 4) * WORDS + wi) * scale
        if EMULATE:
            pair = _h2_bits(hi, lo)
        else:
            pair = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _quad(tl.broadcast_to(pair[None, :], (BLOCK_N, WORDS)), (BLOCK_N, WORDS // 4, 2, 2))
    else:  # 16-bit activations: 32-bit words j = columns (2 j, 2 j + 1) of the run
        j = tl.arange(0, WORDS // 2)
        x32 = xs.to(tl.pointer_type(tl.int32), bitcast=True)
        lo = tl.load(x32 + I * (WORDS // 2) + j)
        hi = tl.load(x32 + (I + 4) * (WORDS // 2) + j)
        even, odd = _widen(lo, hi, scale, XKIND, EMULATE)  # pairs of words 2 j and 2 j + 1
        e0, e2 = tl.split(tl.reshape(tl.broadcast_to(even[None, :], (BLOCK_N, WORDS // 2)), (BLOCK_N, WORDS // 4, 2)))
        o1, o3 = tl.split(tl.reshape(tl.broadcast_to(odd[None, :], (BLOCK_N, WORDS // 2)), (BLOCK_N, WORDS // 4, 2)))
        return e0, o1, e2, o3


@triton.jit
def _dot_words(wv, xs, scale, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, XKIND: tl.constexpr,
               EMULATE: tl.constexpr):
    """[BLOCK_N, WORDS] words of one group times the group's activations -> [BLOCK_N, WORDS // 4]
    fp32 sums over each run of 4 words (before the group scale)."""
    w0, w1, w2, w3 = _quad(wv, (BLOCK_N, WORDS // 4, 2, 2))
    a0, a1, a2, a3 = _pairs(xs, scale, 0, BLOCK_N, WORDS, XKIND, EMULATE)  # aJ: nibbles (0, 4) of word 4 q + J
    b0, b1, b2, b3 = _pairs(xs, scale, 1, BLOCK_N, WORDS, XKIND, EMULATE)
    c0, c1, c2, c3 = _pairs(xs, scale, 2, BLOCK_N, WORDS, XKIND, EMULATE)
    d0, d1, d2, d3 = _pairs(xs, scale, 3, BLOCK_N, WORDS, XKIND, EMULATE)
    if EMULATE:
        p_lo = tl.zeros(w0.shape, tl.float16)
        p_hi = tl.zeros(w0.shape, tl.float16)
        p_lo, p_hi = _word_emu(p_lo, p_hi, w0, a0, b0, c0, d0)
        p_lo, p_hi = _word_emu(p_lo, p_hi, w1, a1, b1, c1, d1)
        p_lo, p_hi = _word_emu(p_lo, p_hi, w2, a2, b2, c2, d2)
        p_lo, p_hi = _word_emu(p_lo, p_hi, w3, a3, b3, c3, d3)
        return (p_lo + p_hi).to(tl.float32)
    else:
        return tl.inline_asm_elementwise(
            DOT4_ASM, DOT4_CONSTRAINTS,
            [w0, w1, w2, w3, a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2, a3, b3, c3, d3],
            dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_scales(ptrs, SKIND: tl.constexpr, EMULATE: tl.constexpr):
    """Group scales at ptrs [BLOCK_N, WORDS // 4] as fp32.

    In PTX on the GPU: a tl.load gets its layout from the load coalescer, which (Triton 3.6)
    lays these out along rows, unlike the partial sums they multiply; every step then went
    through shared memory with two barriers. An inline-asm load takes its operands' layout.
    """
    if EMULATE:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.inline_asm_elementwise(SCALE_BF16 if SKIND == 0 else (SCALE_FP16 if SKIND == 1 else SCALE_FP32),
                                         "=f,l", [ptrs.to(tl.int64, bitcast=True)], dtype=tl.float32,
                                         is_pure=False, pack=1)


@triton.jit
def _slice_scale(x0, first, last, KSTEP: tl.constexpr, PRE: tl.constexpr):
    """(2^-e, 2^e) with max |x| 2^-e in [0.5, 1) over columns [first, last) * KSTEP of the row.

    Built from the exponent bits of the maximum, so both are exact powers of two; an all-zero
    slice gets 2^126 (harmless). NaN activations still propagate through the products.
    """
    cols = tl.arange(0, PRE)
    mx = tl.zeros([PRE], tl.float32)
    end = last * KSTEP
    for c0 in range(first * KSTEP, end, PRE):
        v = tl.load(x0 + c0 + cols, mask=c0 + cols < end, other=0.0)
        mx = tl.maximum(mx, tl.abs(v.to(tl.float32)))
    ex = (tl.max(mx, 0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent E
    ex = tl.minimum(ex, 252)  # max |x| < 2^(E - 126): scale 2^(126 - E), inverse 2^(E - 126)
    scale = ((253 - ex) << 23).to(tl.float32, bitcast=True)
    inv = ((ex + 1) << 23).to(tl.float32, bitcast=True)
    return scale, inv


@triton.jit
def _gemv_h2_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, steps, steps_per_split,
    stride_xm, stride_wn, stride_sn, stride_om,
    WORDS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    XKIND: tl.constexpr, SKIND: tl.constexpr, PRE: tl.constexpr, UNROLL: tl.constexpr, EMULATE: tl.constexpr,
):
    # One program: BLOCK_N rows of W, activation row pid_m, the K steps [first, last); a step is
    # one quantization group (WORDS words a row, KSTEP columns).
    KSTEP: tl.constexpr = WORDS * 8
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads are never masked (a masked load first zero-fills its registers: one more instruction
    # per 8 bytes): rows past N re-read row N - 1, steps past the slice re-read its last step;
    # neither is ever stored or accumulated.
    rows = tl.minimum(n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + tl.arange(0, WORDS)[None, :]  # [BLOCK_N, WORDS]
    # Scales as [BLOCK_N, WORDS // 4] (equal along a row): loaded straight into the layout of
    # the partial sums they multiply; a [BLOCK_N] vector went through shared memory each step.
    s_ptrs = s_ptr + rows[:, None] * stride_sn + tl.zeros([1, WORDS // 4], tl.int64)
    x0 = x_ptr + pid_m.to(tl.int64) * stride_xm
    first = pid_k * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    end = last - 1
    # The ring's first two steps are requested before the pre-pass, whose latency they overlap.
    w_a = tl.load(w_ptrs + first * WORDS)
    s_a = _load_scales(s_ptrs + first, SKIND, EMULATE)
    w_b = tl.load(w_ptrs + tl.minimum(first + 1, end) * WORDS)
    s_b = _load_scales(s_ptrs + tl.minimum(first + 1, end), SKIND, EMULATE)
    scale, inv = _slice_scale(x0, first, last, KSTEP, PRE)

    acc = tl.zeros([BLOCK_N, WORDS // 4], tl.float32)
    for st in tl.range(first, last, loop_unroll_factor=UNROLL):
        wv = w_a
        sv = s_a
        w_a = w_b
        s_a = s_b
        w_b = tl.load(w_ptrs + tl.minimum(st + 2, end) * WORDS)
        s_b = _load_scales(s_ptrs + tl.minimum(st + 2, end), SKIND, EMULATE)
        part = _dot_words(wv, x0 + st * KSTEP, scale, BLOCK_N, WORDS, XKIND, EMULATE)
        acc += part * sv

    total = (tl.sum(acc, 1) * inv)[None, :]  # [1, BLOCK_N]
    m = pid_m + tl.arange(0, 1)
    store_rows(total, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS)


def gemv_h2_supported(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether gemv_h2 can run this call: CUDA and not the interpreter (PTX), activations and
    scales in fp32 / fp16 / bf16, G / 8 words a multiple of 4 (groups 32, 64, 128)."""
    group = x.shape[-1] // scales.shape[-1]
    return x.is_cuda and not INTERPRET and x.dtype in _XKIND and scales.dtype in _XKIND and group % 32 == 0


def gemv_h2(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, block_n: int, num_warps: int, split: int, per_split: int,
            emulate: bool = False) -> torch.Tensor:
    """Launch gemv_h2: x2 [M, K] (unit column stride), words = qweight.view(int32) [N, K / 8],
    scales [N, K / G], out [M, N] (written). `split` K slices of `per_split` groups each (the
    caller's split-K choice); emulate=True (interpreter only) replaces the PTX."""
    m, k = x2.shape
    n_out = words.shape[0]
    group = k // scales.shape[1]
    steps = k // group
    if x2.dtype != torch.float32 and (x2.stride(0) % 2 or x2.data_ptr() % 4):
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()  # 32-bit reads of column pairs
    tiles = triton.cdiv(n_out, block_n) * m
    part = torch.empty(split, m, n_out, device=x2.device, dtype=torch.float32) if split > 1 else out
    locks = split_locks(x2.device, tiles) if split > 1 else words
    grid = (triton.cdiv(n_out, block_n), m, split)
    _gemv_h2_kernel[grid](
        x2, words, scales, bias if bias is not None else out, out, part, locks, m, n_out, steps, per_split,
        x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        WORDS=group // 8, BLOCK_N=block_n, SPLIT=split > 1, HAS_BIAS=bias is not None, XKIND=_XKIND[x2.dtype],
        SKIND=_XKIND[scales.dtype], PRE=PRE_COLS, UNROLL=UNROLL, EMULATE=emulate, num_warps=num_warps, num_stages=1,
    )
    return out


def emulate_gemv_h2(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None, per_split: int | None = None) -> torch.Tensor:
    """gemv_h2's arithmetic in torch: x [M, K] -> [M, N] in x's dtype, K slices of `per_split`
    groups (None: one slice). Same power-of-two slice scaling, same fp16 pairs, products and
    partials rounded to fp16 in the kernel's order (each fp16 FMA rounded once, through float64),
    fp32 fold with the group scales. Only the order of the final fp32 sums differs."""
    m, k = x.shape
    n = qweight.shape[0]
    steps = scales.shape[1]
    group = k // steps
    wpg = group // 8
    per_split = per_split or steps
    w32 = qweight.view(torch.int32).reshape(n, steps, wpg // 4, 4).long() & 0xFFFFFFFF  # [N, step, q, j]
    codes = torch.stack([(w32 >> (4 * i)) & 15 for i in range(8)], -1).double() - 8  # [N, step, q, j, i]
    out = torch.zeros(m, n, dtype=torch.float64, device=x.device)
    for s0 in range(0, steps, per_split):
        s1 = min(s0 + per_split, steps)
        xs = x[:, s0 * group:s1 * group].float()  # [M, cols]
        ex = ((xs.abs().amax(1).view(torch.int32) >> 23) & 0xFF).clamp(max=252)
        scale = torch.ldexp(torch.ones(m, device=x.device), 126 - ex.float())  # [M], exact powers of two
        xh = (xs * scale[:, None]).half().double()
        # column i * W + 4 q + j of a step -> [M, step, q, j, i]
        xh = xh.reshape(m, s1 - s0, 8, wpg // 4, 4).permute(0, 1, 3, 4, 2)
        c = codes[:, s0:s1]
        p = torch.zeros(m, n, s1 - s0, wpg // 4, 2, dtype=torch.float64, device=x.device)  # fp16x2 partials
        for j in range(4):
            for i in range(4):
                for h in range(2):
                    prod = c[None, :, :, :, j, i + 4 * h] * xh[:, None, :, :, j, i + 4 * h]
                    p[..., h] = (p[..., h] + prod).half().double()  # exact in float64, rounded once
        folded = (p[..., 0] + p[..., 1]).half().float()  # [M, N, step, q]
        part = (folded * scales[None, :, s0:s1, None].float()).sum((2, 3)) / scale[:, None]
        out += part.double()
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)
