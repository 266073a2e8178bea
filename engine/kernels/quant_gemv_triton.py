"""Triton weight-only int8 / int4 GEMV for decode-sized M (formats in quant_matmul.py).

Memory-bound design: at M <= 4 every weight byte is used M times, so the kernel must stream the
packed weights at close to copy bandwidth while spending few instructions per byte (at 4 TB/s
an H200 SM must retire ~16 weight bytes a cycle; it issues 128 thread-instructions a cycle).

- A program owns BLOCK_N output channels (rows of W), up to 4 activation rows, and a slice of K
  (split-K). Rows of W are read as 32-bit words along K: a thread's 16-byte load carries 32 int4
  (16 int8) codes of one row, and the activations matching them are 8 (int4) or 16 (int8)
  short loads shared by all the W rows the thread holds.
- Codes become fp32 without int-to-float conversions (a quarter-rate unit): a code field is
  masked in place and combined with the bits of a power of two whose mantissa's last bit lines
  up with the field's lowest bit, so the float reads 2**E + code exactly; one exact FADD removes
  2**E and the code offset. Per code: one LOP3, one FADD, then one FFMA per activation row.
- Products accumulate in fp32 per (W row, word) lane; int4 group scales multiply each group's
  lane sums once (one FFMA per 8 codes); the cross-thread reduction runs once, at the end.
- Split-K partials are reduced in the same launch (quant_split_triton.py).
- Triton's software pipeliner does not stage loads that feed no tl.dot, so the kernel keeps its
  own two-step register ring of weights and scales (PREFETCH = 2): step st + 2 is requested
  while step st is computed, whatever order the compiler gives the loop body.
"""
from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels._triton_util import wait_for_inputs
from engine.kernels.quant_split_triton import split_fixup, store_rows

MAGIC7 = 0x43000000  # bit pattern of the fp32 2**7, passed at run time (see _field)


@triton.jit
def _field(src, magic7, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-wide field at bit SHIFT of src (uint32; SHIFT + BITS <= 23), as an exact fp32 code.

    The field is masked in place and combined with the bits of 2**E, E = 23 - SHIFT, whose
    mantissa's last bit then lines up with the field's lowest bit: the float reads 2**E + field,
    and one exact FADD removes 2**E and the code offset (8 for int4; int8 codes are two's
    complement, so the same XOR also flips the field's top bit, giving byte + 128).
    magic7 arrives at run time so the constant lives in a register and mask-then-xor compiles to
    a single LOP3 (an instruction takes one immediate).
    """
    E: tl.constexpr = 23 - SHIFT
    if BITS == 4:
        magic = magic7 + ((16 - SHIFT) << 23)  # bits of 2**E
        f = (src & (0xF << SHIFT)) ^ magic
        return f.to(tl.float32, bitcast=True) - (2.0**E + 8.0)
    else:
        magic = magic7 + (((16 - SHIFT) << 23) | (0x80 << SHIFT))  # 2**E, plus the sign flip
        f = (src & (0xFF << SHIFT)) ^ magic
        return f.to(tl.float32, bitcast=True) - (2.0**E + 128.0)


@triton.jit
def _int4_planes(wv, mg):
    """The 8 nibbles of each word as fp32 codes c - 8 (nibble i: group column i * WORDS + w)."""
    w16 = wv >> 16  # nibbles 5..7 moved to bits 4..12; 0..4 are read in place
    return (_field(wv, mg, 0, 4), _field(wv, mg, 4, 4), _field(wv, mg, 8, 4), _field(wv, mg, 12, 4),
            _field(wv, mg, 16, 4), _field(w16, mg, 4, 4), _field(w16, mg, 8, 4), _field(w16, mg, 12, 4))


@triton.jit
def _xload(ptrs, wi, lim):
    """Activations as fp32; lim (WORDS for a row below M, else 0; None: always) masks the row."""
    if lim is None:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=wi < lim, other=0.0).to(tl.float32)


@triton.jit
def _int4_row(v, xs, wi, ok, WORDS: tl.constexpr):
    """Sum over the 8 nibble planes of codes times the matching activations, [BLOCK_N, WORDS]."""
    p = v[0] * _xload(xs + wi, wi, ok)[None, :]
    p += v[1] * _xload(xs + WORDS + wi, wi, ok)[None, :]
    p += v[2] * _xload(xs + 2 * WORDS + wi, wi, ok)[None, :]
    p += v[3] * _xload(xs + 3 * WORDS + wi, wi, ok)[None, :]
    p += v[4] * _xload(xs + 4 * WORDS + wi, wi, ok)[None, :]
    p += v[5] * _xload(xs + 5 * WORDS + wi, wi, ok)[None, :]
    p += v[6] * _xload(xs + 6 * WORDS + wi, wi, ok)[None, :]
    p += v[7] * _xload(xs + 7 * WORDS + wi, wi, ok)[None, :]
    return p


@triton.jit
def _int8_planes(wv, mg):
    """The 4 bytes of each word as fp32 codes (byte t: column 4 * w + t of the step)."""
    w12 = wv >> 12  # bytes 2, 3 moved to bits 4, 12; 0, 1 are read in place
    return _field(wv, mg, 0, 8), _field(wv, mg, 8, 8), _field(w12, mg, 4, 8), _field(w12, mg, 12, 8)


@triton.jit
def _int8_row(acc, v, xs, wi, ok):
    """acc plus the 4 byte planes' codes times the matching activations, [BLOCK_N, WORDS]."""
    acc += v[0] * _xload(xs + 4 * wi, wi, ok)[None, :]
    acc += v[1] * _xload(xs + 4 * wi + 1, wi, ok)[None, :]
    acc += v[2] * _xload(xs + 4 * wi + 2, wi, ok)[None, :]
    acc += v[3] * _xload(xs + 4 * wi + 3, wi, ok)[None, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, steps, steps_per_split, magic7,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    # A step covers WORDS 32-bit words of each W row, KSTEP columns of K. int4: a step is one
    # quantization group. int8: byte t of word w holds column 4 * w + t of the step.
    KSTEP: tl.constexpr = WORDS * (32 // BITS)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = pid_m * BLOCK_M
    n_ok = n < N
    wi = tl.arange(0, WORDS)
    w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_wn + wi[None, :]  # [BLOCK_N, WORDS]
    x0 = x_ptr + m0.to(tl.int64) * stride_xm
    s_ptrs = s_ptr + n.to(tl.int64) * stride_sn
    mg = magic7.to(tl.uint32, bitcast=True)

    acc0 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    first = pid_k * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    if PREFETCH == 2:
        w_a = tl.load(w_ptrs + first * WORDS, mask=(n < tl.where(first < last, N, 0))[:, None], other=0)
        w_b = tl.load(w_ptrs + (first + 1) * WORDS, mask=(n < tl.where(first + 1 < last, N, 0))[:, None], other=0)
        if BITS == 4:
            s_a = tl.load(s_ptrs + first, mask=n < tl.where(first < last, N, 0), other=0.0)
            s_b = tl.load(s_ptrs + first + 1, mask=n < tl.where(first + 1 < last, N, 0), other=0.0)
    wait_for_inputs(PDL)  # weights and scales above may be read before it, activations not
    for st in range(first, last):
        if PREFETCH == 2:
            wv = w_a
            w_a = w_b
            w_b = tl.load(w_ptrs + (st + 2) * WORDS, mask=(n < tl.where(st + 2 < last, N, 0))[:, None], other=0)
            if BITS == 4:
                sv = s_a
                s_a = s_b
                s_b = tl.load(s_ptrs + st + 2, mask=n < tl.where(st + 2 < last, N, 0), other=0.0)
        else:
            wv = tl.load(w_ptrs + st * WORDS, mask=n_ok[:, None], other=0)
            if BITS == 4:
                sv = tl.load(s_ptrs + st, mask=n_ok, other=0.0)
        wv = wv.to(tl.uint32, bitcast=True)
        xs = x0 + st * KSTEP
        if BITS == 4:
            v = _int4_planes(wv, mg)
            s2 = sv.to(tl.float32)[:, None]
            acc0 += _int4_row(v, xs, wi, None, WORDS) * s2
            if BLOCK_M >= 2:
                acc1 += _int4_row(v, xs + stride_xm, wi, tl.where(m0 + 1 < M, WORDS, 0), WORDS) * s2
            if BLOCK_M >= 4:
                acc2 += _int4_row(v, xs + 2 * stride_xm, wi, tl.where(m0 + 2 < M, WORDS, 0), WORDS) * s2
                acc3 += _int4_row(v, xs + 3 * stride_xm, wi, tl.where(m0 + 3 < M, WORDS, 0), WORDS) * s2
        else:
            v = _int8_planes(wv, mg)
            acc0 = _int8_row(acc0, v, xs, wi, None)
            if BLOCK_M >= 2:
                acc1 = _int8_row(acc1, v, xs + stride_xm, wi, tl.where(m0 + 1 < M, WORDS, 0))
            if BLOCK_M >= 4:
                acc2 = _int8_row(acc2, v, xs + 2 * stride_xm, wi, tl.where(m0 + 2 < M, WORDS, 0))
                acc3 = _int8_row(acc3, v, xs + 3 * stride_xm, wi, tl.where(m0 + 3 < M, WORDS, 0))

    # [BLOCK_M, BLOCK_N] from the per-row accumulators (rows past BLOCK_M stay unused).
    r = tl.arange(0, BLOCK_M)[:, None]
    total = tl.where(r == 0, tl.sum(acc0, 1)[None, :], 0.0)
    if BLOCK_M >= 2:
        total = tl.where(r == 1, tl.sum(acc1, 1)[None, :], total)
    if BLOCK_M >= 4:
        total = tl.where(r == 2, tl.sum(acc2, 1)[None, :], total)
        total = tl.where(r == 3, tl.sum(acc3, 1)[None, :], total)
    if BITS == 8:
        total = total * tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    m = m0 + tl.arange(0, BLOCK_M)
    store_rows(total, m, n, M, N, bias_ptr, out_ptr, part_ptr, stride_om, pid_k, SPLIT, HAS_BIAS, ACCUMULATE)
    if SPLIT:
        split_fixup(lock_ptr, pid_m * tl.num_programs(0) + pid_n, part_ptr, bias_ptr, out_ptr, m, n, M, N,
                    stride_om, HAS_BIAS, ACCUMULATE)
