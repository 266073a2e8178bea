"""Triton int4 / int8 GEMV on packed halves ("gemv_h2"), for the formats of quant_matmul.py.

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

int8 (BITS = 8; per-channel scales, codes two's complement, byte t of word w = column 4 w + t
of a step of INT8_STEP columns):

- Bytes (0, 2) of a word: (w & 0x00FF00FF) ^ 0x64806480 in one LOP3. Each half's low byte is
  the code's bits u = c mod 256; XOR 0x80 flips its top bit, giving u ^ 0x80 = c + 128 in
  [0, 255] (two's complement), under the exponent bits of 0x6400 (fp16 1024, whose mantissa's
  last bit is worth 1): the halves read 1152 + c exactly. Bytes (1, 3): the same after one
  shift by 8. One HADD2 (-1152, exact: |c| <= 128) leaves (c, c'); one HFMA2 multiplies by the
  activation pair (columns 4 w + t, 4 w + t + 2). Per word: 1 SHF, 2 LOP3, 2 HADD2, 2 HFMA2,
  7 instructions for 4 bytes (the fp32 GEMV: 12); a thread's 4 words of a row (16 products a
  half) fold into fp32 as for int4, without a scale; the per-channel scale multiplies the row's
  sum once, after the K loop.
- Activations: a thread reads the 4 columns of a word as one 64-bit load (16-bit x) and packs
  the pairs (4 w, 4 w + 2), (4 w + 1, 4 w + 3) with the same widen-scale-pack as for int4: two
  pairs a word instead of four, so half the int4 activation work per weight byte.
- Range: the slice is scaled so its largest |x| lies in [8, 16) (TOP = 4): a product is at most
  128 x 16 = 2^11, a half's run of 8 at most 2^14 and the fold 2^15 < 65504. The 16x headroom
  over [0.5, 1) keeps activations down to 2^-18 (not 2^-14) of the slice maximum out of fp16
  subnormals. Error as for int4: each product and partial rounds at 2^-11 of a 16-product
  partial, independently, summed in fp32: 3-7e-4 of the output's largest value on random data
  (tested at <= 1.5e-3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET, pdl_launch, wait_for_inputs
from engine.kernels.quant_split_triton import split_fixup, split_scratch, store_rows

PRE_COLS = 2048  # activation columns per iteration of the max-abs pre-pass
RING_DEPTHS = (2, 3)  # steps of weights and scales in flight ahead of the one being computed
# The loop is unrolled DEPTH + 1 times: that many copies of its body rotate the ring's registers
# in place (no moves).
INT8_STEP = 64  # int8 columns a step: 16 words a row, a thread's 16-byte load is 4 of them
INT8_TOP = 4  # int8 slices are scaled to max |x| in [2^(TOP-1), 2^TOP) (see the docstring)
TOP8 = tl.constexpr(INT8_TOP)
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
    return "\n".join(lines + _FOLD)


# The fp16x2 run p -> its two halves added in fp16, widened to the fp32 output $0.
_FOLD = ["mov.b32 {lo, hi}, p;", "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $0, lo;", "}"]


def _dot8_asm() -> str:
    """PTX: 4 words of int8 codes ($1..$4) and their 8 fp16x2 activation pairs ($5 + 2 j + i:
    word j, bytes (i, i + 2)) -> the fp32 sum of the 16 products c x, accumulated in fp16x2."""
    lines = [
        "{",
        ".reg .b32 s, a, b, p, kmag, kneg;",
        ".reg .f16 lo, hi;",
        "mov.b32 kmag, 0x64806480;",  # XOR: sign-flipped byte under fp16 1024 -> 1152 + c
        "mov.b32 kneg, 0xE480E480;",  # -1152
    ]
    for j in range(4):
        w = f"${1 + j}"
        lines += [
            f"shr.b32 s, {w}, 8;",
            f"lop3.b32 a, {w}, 0x00FF00FF, kmag, 0x6A;",  # 0x6A: (a & b) ^ c
            "lop3.b32 b, s, 0x00FF00FF, kmag, 0x6A;",
            "add.rn.f16x2 a, a, kneg;",
            "add.rn.f16x2 b, b, kneg;",
            f"mul.rn.f16x2 p, a, ${5 + 2 * j};" if j == 0 else f"fma.rn.f16x2 p, a, ${5 + 2 * j}, p;",
            f"fma.rn.f16x2 p, b, ${6 + 2 * j}, p;",
        ]
    return "\n".join(lines + _FOLD)


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
DOT8_ASM = tl.constexpr(_dot8_asm())
DOT8_CONSTRAINTS = tl.constexpr("=f" + ",r" * 12)  # one fp32 out; 4 words and 8 pairs in
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
def _fma_emu(p_lo, p_hi, c_lo, c_hi, x):
    """(p_lo, p_hi) + (c_lo, c_hi) x for the fp16x2 pair x (int32 bits), each half an fp16 FMA."""
    p_lo = (c_lo.to(tl.float32) * _half(x, 0).to(tl.float32) + p_lo.to(tl.float32)).to(tl.float16)
    p_hi = (c_hi.to(tl.float32) * _half(x, 16).to(tl.float32) + p_hi.to(tl.float32)).to(tl.float16)
    return p_lo, p_hi


@triton.jit
def _nibbles_emu(p_lo, p_hi, w, x, I: tl.constexpr):
    """p + (c - 8) x for nibbles (I, I + 4) of w against the fp16x2 pair x (fp16 FMA)."""
    return _fma_emu(p_lo, p_hi, ((w >> (4 * I)) & 15) - 8, ((w >> (4 * I + 16)) & 15) - 8, x)


@triton.jit
def _bytes_emu(p_lo, p_hi, w, x, I: tl.constexpr):
    """p + c x for the signed bytes (I, I + 2) of w against the fp16x2 pair x (fp16 FMA)."""
    return _fma_emu(p_lo, p_hi, (w << (24 - 8 * I)) >> 24, (w << (8 - 8 * I)) >> 24, x)


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
def _pack(hi, lo, EMULATE: tl.constexpr):
    """fp32 hi, lo -> the fp16x2 (hi, lo) as int32, each rounded to nearest."""
    if EMULATE:
        return _h2_bits(hi, lo)
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _pairs(xs, scale, I: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, XKIND: tl.constexpr,
           EMULATE: tl.constexpr):
    """fp16x2 activation pairs (columns I W + w, (I + 4) W + w) of the step at xs, scaled by
    2^-e, as four [BLOCK_N, WORDS // 4] tensors for words 4 q + 0..3 (broadcast along rows)."""
    if XKIND == 2:  # fp32 activations: one column a load
        wi = tl.arange(0, WORDS)
        pair = _pack(tl.load(xs + (I + 4) * WORDS + wi) * scale, tl.load(xs + I * WORDS + wi) * scale, EMULATE)
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
def _byte_pairs(xs, scale, WORDS: tl.constexpr, XKIND: tl.constexpr, EMULATE: tl.constexpr):
    """int8: the step's fp16x2 activation pairs for bytes (0, 2) and (1, 3) of each word w, i.e.
    columns (4 w, 4 w + 2) and (4 w + 1, 4 w + 3), scaled by 2^-e: two [WORDS] tensors."""
    wi = tl.arange(0, WORDS)
    if XKIND == 2:  # fp32 activations: one column a load
        x0 = tl.load(xs + 4 * wi) * scale
        x1 = tl.load(xs + 4 * wi + 1) * scale
        x2 = tl.load(xs + 4 * wi + 2) * scale
        x3 = tl.load(xs + 4 * wi + 3) * scale
        return _pack(x2, x0, EMULATE), _pack(x3, x1, EMULATE)
    else:  # 16-bit activations: one 64-bit load holds a word's 4 columns
        v = tl.load(xs.to(tl.pointer_type(tl.int64), bitcast=True) + wi)
        return _widen(v.to(tl.int32), (v >> 32).to(tl.int32), scale, XKIND, EMULATE)


@triton.jit
def _dot_bytes(wv, xs, scale, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, XKIND: tl.constexpr,
               EMULATE: tl.constexpr):
    """int8: [BLOCK_N, WORDS] words of one step times its activations -> [BLOCK_N, WORDS // 4]
    fp32 sums over each run of 4 words (before the per-channel scale)."""
    w0, w1, w2, w3 = _quad(wv, (BLOCK_N, WORDS // 4, 2, 2))
    even, odd = _byte_pairs(xs, scale, WORDS, XKIND, EMULATE)
    e0, e1, e2, e3 = _quad(tl.broadcast_to(even[None, :], (BLOCK_N, WORDS)), (BLOCK_N, WORDS // 4, 2, 2))
    o0, o1, o2, o3 = _quad(tl.broadcast_to(odd[None, :], (BLOCK_N, WORDS)), (BLOCK_N, WORDS // 4, 2, 2))
    if EMULATE:
        p_lo = tl.zeros(w0.shape, tl.float16)
        p_hi = tl.zeros(w0.shape, tl.float16)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w0, e0, 0)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w0, o0, 1)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w1, e1, 0)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w1, o1, 1)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w2, e2, 0)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w2, o2, 1)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w3, e3, 0)
        p_lo, p_hi = _bytes_emu(p_lo, p_hi, w3, o3, 1)
        return (p_lo + p_hi).to(tl.float32)
    else:
        return tl.inline_asm_elementwise(DOT8_ASM, DOT8_CONSTRAINTS, [w0, w1, w2, w3, e0, o0, e1, o1, e2, o2, e3, o3],
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
def _slice_scale(x0, first, last, KSTEP: tl.constexpr, PRE: tl.constexpr, TOP: tl.constexpr):
    """(2^-e, 2^e) with max |x| 2^-e in [2^(TOP - 1), 2^TOP) over columns [first, last) * KSTEP
    of the row.

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
    # max |x| < 2^(E - 126): scale 2^(126 + TOP - E), inverse 2^(E - 126 - TOP); the clamp keeps
    # both normal fp32 numbers.
    ex = tl.minimum(tl.maximum(ex, TOP), 252)
    scale = ((253 - ex + TOP) << 23).to(tl.float32, bitcast=True)
    inv = ((ex + 1 - TOP) << 23).to(tl.float32, bitcast=True)
    return scale, inv


@triton.jit
def _gemv_h2_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, steps, steps_per_split,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    XKIND: tl.constexpr, SKIND: tl.constexpr, PRE: tl.constexpr, DEPTH: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program: BLOCK_N rows of W, activation row pid_m, the K steps [first, last); a step is
    # WORDS words a row, KSTEP columns: one quantization group (int4) or INT8_STEP columns (int8).
    KSTEP: tl.constexpr = WORDS * (32 // BITS)
    TOP: tl.constexpr = 0 if BITS == 4 else TOP8
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads are never masked (a masked load first zero-fills its registers: one more instruction
    # per 8 bytes): rows past N re-read row N - 1, steps past the slice re-read its last step;
    # neither is ever stored or accumulated.
    rows = tl.minimum(n, N - 1).to(tl.int64)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + tl.arange(0, WORDS)[None, :]  # [BLOCK_N, WORDS]
    # int4 group scales as [BLOCK_N, WORDS // 4] (equal along a row): loaded straight into the
    # layout of the partial sums they multiply; a [BLOCK_N] vector went through shared memory.
    s_ptrs = s_ptr + rows[:, None] * stride_sn + tl.zeros([1, WORDS // 4], tl.int64)
    x0 = x_ptr + pid_m.to(tl.int64) * stride_xm
    first = pid_k * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    end = last - 1
    # The ring's first DEPTH steps are requested before the pre-pass, whose latency they overlap
    # (and, under programmatic dependent launch, before the wait for the previous kernel).
    w_a = tl.load(w_ptrs + first * WORDS)
    w_b = tl.load(w_ptrs + tl.minimum(first + 1, end) * WORDS)
    if DEPTH == 3:
        w_c = tl.load(w_ptrs + tl.minimum(first + 2, end) * WORDS)
    if BITS == 4:
        s_a = _load_scales(s_ptrs + first, SKIND, EMULATE)
        s_b = _load_scales(s_ptrs + tl.minimum(first + 1, end), SKIND, EMULATE)
        if DEPTH == 3:
            s_c = _load_scales(s_ptrs + tl.minimum(first + 2, end), SKIND, EMULATE)
    wait_for_inputs(PDL)
    scale, inv = _slice_scale(x0, first, last, KSTEP, PRE, TOP)

    acc = tl.zeros([BLOCK_N, WORDS // 4], tl.float32)
    for st in tl.range(first, last, loop_unroll_factor=DEPTH + 1):
        wv = w_a
        w_a = w_b
        if DEPTH == 3:
            w_b = w_c
            w_c = tl.load(w_ptrs + tl.minimum(st + 3, end) * WORDS)
        else:
            w_b = tl.load(w_ptrs + tl.minimum(st + 2, end) * WORDS)
        if BITS == 4:
            sv = s_a
            s_a = s_b
            if DEPTH == 3:
                s_b = s_c
                s_c = _load_scales(s_ptrs + tl.minimum(st + 3, end), SKIND, EMULATE)
            else:
                s_b = _load_scales(s_ptrs + tl.minimum(st + 2, end), SKIND, EMULATE)
            acc += _dot_words(wv, x0 + st * KSTEP, scale, BLOCK_N, WORDS, XKIND, EMULATE) * sv
        else:
            acc += _dot_bytes(wv, x0 + st * KSTEP, scale, BLOCK_N, WORDS, XKIND, EMULATE)

    total = tl.sum(acc, 1) * inv  # [BLOCK_N]
    if BITS == 8:  # the per-channel scale commutes with the K sum
        total = total * tl.load(s_ptr + rows).to(tl.float32)
    m = pid_m + tl.arange(0, 1)
    store_rows(total[None, :], m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)


def gemv_h2_supported(x: torch.Tensor, scales: torch.Tensor, bits: int = 4) -> bool:
    """Whether the dispatcher runs gemv_h2 for this call: CUDA and not the interpreter (PTX), 16-bit
    activations (fp32 callers get the fp32 GEMV: this kernel's products are fp16, ~1e-3 of the
    output), scales in fp32 / fp16 / bf16; int4: G / 8 words a multiple of 4 (groups 32, 64, 128);
    int8: K a multiple of INT8_STEP. The kernel itself also takes fp32 activations."""
    if not (x.is_cuda and not INTERPRET and x.dtype in (torch.float16, torch.bfloat16)
            and scales.dtype in _XKIND):
        return False
    if bits == 8:
        return scales.dim() == 1 and x.shape[-1] % INT8_STEP == 0
    return (x.shape[-1] // scales.shape[-1]) % 32 == 0


def gemv_h2_steps(k: int, scales: torch.Tensor, bits: int = 4) -> int:
    """K steps of a row (what `per_split` counts): int4 groups, or int8 runs of INT8_STEP columns."""
    return scales.shape[1] if bits == 4 else k // INT8_STEP


def gemv_h2(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, block_n: int, num_warps: int, split: int, per_split: int,
            emulate: bool = False, bits: int = 4, accumulate: bool = False, depth: int = 2) -> torch.Tensor:
    """Launch gemv_h2: x2 [M, K] (unit column stride), words = qweight.view(int32) ([N, K / 8]
    int4, [N, K / 4] int8), scales [N, K / G] (int4) or [N] (int8), out [M, N] (written).
    `split` K slices of `per_split` steps each (the caller's split-K choice, see gemv_h2_steps);
    emulate=True (interpreter only) replaces the PTX; accumulate=True adds the product to out;
    depth: steps in flight ahead of the one computed (RING_DEPTHS)."""
    assert depth in RING_DEPTHS, depth
    m, k = x2.shape
    n_out = words.shape[0]
    steps = gemv_h2_steps(k, scales, bits)
    align = 8 if bits == 8 else 4  # 64-bit (int8) or 32-bit (int4) reads of 16-bit activations
    if x2.dtype != torch.float32 and (x2.stride(0) % (align // 2) or x2.data_ptr() % align):
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    tiles = triton.cdiv(n_out, block_n) * m
    part, locks = split_scratch(out, split, tiles, words)
    grid = (triton.cdiv(n_out, block_n), m, split)
    _gemv_h2_kernel[grid](
        x2, words, scales, bias if bias is not None else out, out, part, locks, m, n_out, steps, per_split,
        x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, WORDS=16 if bits == 8 else k // steps // 8, BLOCK_N=block_n, SPLIT=split > 1,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, XKIND=_XKIND[x2.dtype], SKIND=_XKIND[scales.dtype],
        PRE=PRE_COLS, DEPTH=depth,
        EMULATE=emulate, num_warps=num_warps, num_stages=1, **pdl_launch(x2.device, early_trigger=False),
    )
    return out


# --- the same arithmetic in torch (for shapes too large for the interpreter) -----------------

def _emulate_scale(xs: torch.Tensor, top: int) -> torch.Tensor:
    """Per row of xs [M, cols]: the slice scale 2^-e of _slice_scale, as fp32 [M]."""
    ex = ((xs.abs().amax(1).view(torch.int32) >> 23) & 0xFF).clamp(min=top, max=252)
    return torch.ldexp(torch.ones(xs.shape[0], device=xs.device), 126 + top - ex.float())


def _emulate_runs(codes: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    """codes [N, step, q, j, 2 P] (word j of run q; the word's pair i holds codes i and i + P),
    xh [M, step, q, j, 2 P] the matching fp16 activations -> [M, N, step, q] fp32 run sums:
    fp16x2 FMAs in the kernel's order (word, then pair), each rounded once, then the fold."""
    half = codes.shape[-1] // 2
    m, n = xh.shape[0], codes.shape[0]
    p = torch.zeros(m, n, *codes.shape[1:3], 2, dtype=torch.float64, device=xh.device)  # fp16x2 partials
    for j in range(4):
        for i in range(half):
            for h in range(2):
                prod = codes[None, :, :, :, j, i + half * h] * xh[:, None, :, :, j, i + half * h]
                p[..., h] = (p[..., h] + prod).half().double()  # exact in float64, rounded once
    return (p[..., 0] + p[..., 1]).half().float()


def emulate_gemv_h2(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None, per_split: int | None = None, bits: int = 4) -> torch.Tensor:
    """gemv_h2's arithmetic in torch: x [M, K] -> [M, N] in x's dtype, K slices of `per_split`
    steps (None: one slice). Same power-of-two slice scaling, same fp16 pairs, products and
    partials rounded to fp16 in the kernel's order (each fp16 FMA rounded once, through float64),
    fp32 fold with the int4 group scales (int8: the per-channel scale at the end). Only the
    order of the final fp32 sums differs."""
    m, k = x.shape
    n = qweight.shape[0]
    steps = gemv_h2_steps(k, scales, bits)
    cols = k // steps
    per_split = per_split or steps
    if bits == 8:  # column 16 q + 4 j + t of a step is byte t of word 4 q + j
        codes = qweight.reshape(n, steps, 4, 4, 4).double()  # [N, step, q, j, t]
    else:
        wpg = cols // 8
        w32 = qweight.view(torch.int32).reshape(n, steps, wpg // 4, 4).long() & 0xFFFFFFFF  # [N, step, q, j]
        codes = torch.stack([(w32 >> (4 * i)) & 15 for i in range(8)], -1).double() - 8  # [N, step, q, j, i]
    out = torch.zeros(m, n, dtype=torch.float64, device=x.device)
    for s0 in range(0, steps, per_split):
        s1 = min(s0 + per_split, steps)
        xs = x[:, s0 * cols:s1 * cols].float()  # [M, cols]
        scale = _emulate_scale(xs, INT8_TOP if bits == 8 else 0)  # [M], exact powers of two
        xh = (xs * scale[:, None]).half().double()
        if bits == 8:
            xh = xh.reshape(m, s1 - s0, 4, 4, 4)
            part = _emulate_runs(codes[:, s0:s1], xh).sum((2, 3)) / scale[:, None] * scales.float()
        else:  # column i * W + 4 q + j of a group -> [M, step, q, j, i]
            xh = xh.reshape(m, s1 - s0, 8, wpg // 4, 4).permute(0, 1, 3, 4, 2)
            folded = _emulate_runs(codes[:, s0:s1], xh)  # [M, N, step, q]
            part = (folded * scales[None, :, s0:s1, None].float()).sum((2, 3)) / scale[:, None]
        out += part.double()
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)
