"""Compile the Triton kernels for sm_90 on a machine without a GPU and report their machine code.

For each case: registers, spills (stack bytes), and the instruction mix of the hot loop, with
thread-instructions per weight (or KV) byte: an H200 SM issues 128 thread-instructions a cycle
and must take ~16 bytes a cycle to run at copy speed, so ~8 per byte is the most a streaming
kernel can afford. Needs the `triton` package with its NVIDIA backend (ptxas, nvdisasm ship in
it); no driver or GPU. Run it with the Triton version the GPU machine uses (3.6 at present).

    python benchmarks/sass_report.py                 # every case
    python benchmarks/sass_report.py int4_gemv_m1    # cases whose name contains this
    python benchmarks/sass_report.py int4_gemv_h2    # the packed-half int4 GEMV
    python benchmarks/sass_report.py int8_gemv_h2    # its int8 variant
    python benchmarks/sass_report.py lora_           # the batched-LoRA shrink and expand kernels
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTRS = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32",
            lock_ptr="*i32")
# Integer arguments the launcher passes as multiples of 16 (Triton specializes on that).
DIV16 = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "part_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr",
         "block_tables_ptr", "part_out_ptr", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om",
         "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_cs", "stride_ch", "split_len",
         "a_ptr", "b_ptr", "y_ptr", "stride_as", "stride_ar", "stride_ps", "stride_pm", "stride_bs", "stride_bn",
         "stride_ym", "stride_gs", "off1", "off2", "slice_rank")


def _cases():
    from engine.kernels.paged_decode_triton import _decode_kernel
    from engine.kernels.quant_gemv_h2_triton import PRE_COLS, _gemv_h2_kernel
    from engine.kernels.quant_gemv_triton import _gemv_kernel
    from engine.kernels.quant_matmul_triton import _int4_dot_kernel, _int8_dot_kernel
    from engine.kernels.quant_mma_triton import _int4_mma_kernel
    from engine.kernels.lora_batched_triton import _expand_kernel, _shrink_kernel

    def gemv(bits, words, bm, bn, warps):
        return (_gemv_kernel, PTRS, dict(BITS=bits, WORDS=words, BLOCK_M=bm, BLOCK_N=bn, SPLIT=True, HAS_BIAS=False,
                                         PREFETCH=2), warps, 1, bn * words * 4)

    def gemv_h2(bn, warps, bits=4, depth=2):  # the hot loop is depth + 1 steps of 16 words (64 bytes) a row
        return (_gemv_h2_kernel, PTRS, dict(BITS=bits, WORDS=16, BLOCK_N=bn, SPLIT=True, HAS_BIAS=False, XKIND=0,
                                            SKIND=0, PRE=PRE_COLS, DEPTH=depth, EMULATE=False), warps, 1,
                bn * 64 * (depth + 1))

    def dot4(bm, bn, warps, permuted=False):
        return (_int4_dot_kernel, PTRS, dict(GROUP=128, MAGIC=128, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, SPLIT=True,
                                             HAS_BIAS=False, PREFETCH=2, X_PERMUTED=permuted), warps, 3, bn * 64)

    def mma4(bm, bn, warps, stages=3, w_is_a=False, group=128):  # one group a step: bn * group / 2 bytes
        return (_int4_mma_kernel, PTRS, dict(GROUP=group, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, SPLIT=True,
                                             HAS_BIAS=False, W_IS_A=w_is_a, ASM=group == 128, SKIND=0,
                                             EMULATE=False), warps, stages, bn * group // 2)

    def dot8(bm, bn, warps, bk=128):
        return (_int8_dot_kernel, dict(PTRS, w_ptr="*i8"), dict(PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                SPLIT=True, HAS_BIAS=False), warps, 4, bn * bk)

    dec_ptrs = dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_tables_ptr="*i32",
                    context_lens_ptr="*i32", out_ptr="*bf16", part_out_ptr="*fp32", part_lse_ptr="*fp32",
                    scale_log2="fp32")

    def decode(bn, warps, stages):
        return (_decode_kernel, dec_ptrs, dict(GROUP=4, G_PAD=16, HEAD_DIM=128, D_PAD=128, PAGE=16, SPLIT=True,
                                                  PREC="tf32", BLOCK_N=bn), warps, stages, bn * 128 * 2 * 2)

    lora_ptrs = dict(x_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32", scale_ptr="*fp32",
                     rescale_ptr="*fp32", rows_ptr="*i32", cslot_ptr="*i32", cstart_ptr="*i32", clen_ptr="*i32")

    def shrink(bm, br):  # loop bytes: the A tile (the adapter weight) per K step
        return (_shrink_kernel, lora_ptrs, dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=128, PREC="tf32"), 4, 3, br * 128 * 2)

    def expand(bm, bn, slices, warps, by_row=False, dora=True):  # the loop walks column tiles (B: bn x 16)
        return (_expand_kernel, lora_ptrs, dict(HAS_RESCALE=dora, SPLITS=1 if by_row else 8, NUM_SLICES=slices,
                                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=16, PREC="tf32", FULL_R=True,
                                                BY_ROW=by_row), warps, 3, bn * 16 * 2)

    return {
        "lora_shrink_m16_r16": shrink(16, 16), "lora_shrink_m16_r64": shrink(16, 64),
        "lora_shrink_m64_r64": shrink(64, 64),
        "lora_expand_m16_n128_s1_w4": expand(16, 128, 1, 4), "lora_expand_m16_n128_s3_w4": expand(16, 128, 3, 4),
        "lora_expand_m16_n256_s2_w4": expand(16, 256, 2, 4), "lora_expand_m64_n128_s3_w8": expand(64, 128, 3, 8),
        "lora_expand_rows_m16_n128_s1_w4": expand(16, 128, 1, 4, True, False),
        "lora_expand_rows_m16_n128_s3_w4": expand(16, 128, 3, 4, True, False),
        "lora_expand_rows_dora_m16_n128_s1_w4": expand(16, 128, 1, 4, True, True),
        "int4_gemv_m1_n128_w4": gemv(4, 16, 1, 128, 4), "int4_gemv_m1_n64_w4": gemv(4, 16, 1, 64, 4),
        "int4_gemv_m4_n64_w4": gemv(4, 16, 4, 64, 4), "int8_gemv_m1_n64_w4": gemv(8, 32, 1, 64, 4),
        "int8_gemv_m4_n64_w4": gemv(8, 32, 4, 64, 4),
        "int4_gemv_h2_m1_n256_w4": gemv_h2(256, 4), "int4_gemv_h2_m1_n128_w2": gemv_h2(128, 2),
        "int4_gemv_h2_m1_n128_w4": gemv_h2(128, 4), "int4_gemv_h2_m1_n64_w2": gemv_h2(64, 2),
        "int4_gemv_h2_m1_n256_w8": gemv_h2(256, 8), "int4_gemv_h2_m1_n32_w1": gemv_h2(32, 1),
        "int4_gemv_h2_m1_n64_w2_d3": gemv_h2(64, 2, depth=3), "int4_gemv_h2_m1_n128_w4_d3": gemv_h2(128, 4, depth=3),
        "int8_gemv_h2_m1_n64_w1_d3": gemv_h2(64, 1, 8, depth=3),
        "int8_gemv_h2_m1_n256_w4": gemv_h2(256, 4, 8), "int8_gemv_h2_m1_n128_w2": gemv_h2(128, 2, 8),
        "int8_gemv_h2_m1_n128_w4": gemv_h2(128, 4, 8), "int8_gemv_h2_m1_n64_w2": gemv_h2(64, 2, 8),
        "int8_gemv_h2_m1_n64_w1": gemv_h2(64, 1, 8), "int8_gemv_h2_m1_n32_w1": gemv_h2(32, 1, 8),
        "int4_dot_m16_n128_w8": dot4(16, 128, 8), "int4_dot_m16_n64_w4": dot4(16, 64, 4),
        "int4_dot_m64_n128_w8": dot4(64, 128, 8, True),
        "int4_mma_m16_n64_w4": mma4(16, 64, 4), "int4_mma_m16_n128_w4": mma4(16, 128, 4),
                "int4_mma_m16_n256_w4": mma4(16, 256, 4), "int4_mma_m32_n128_w4": mma4(32, 128, 4),
        "int4_mma_m32_n64_w4": mma4(32, 64, 4), "int4_mma_m64_n64_w4": mma4(64, 64, 4),
        "int4_mma_a_m16_n64_w4": mma4(16, 64, 4, w_is_a=True), "int4_mma_a_m16_n128_w4": mma4(16, 128, 4, w_is_a=True),
        "int4_mma_a_m64_n128_w4": mma4(64, 128, 4, w_is_a=True),
        "int4_mma_a_m64_n128_w8": mma4(64, 128, 8, w_is_a=True), "int4_mma_a_m64_n64_w4": mma4(64, 64, 4, w_is_a=True),
        "int4_mma_a_m64_n256_w8": mma4(64, 256, 8, w_is_a=True),
        "int4_mma_m16_n128_w4_g64": mma4(16, 128, 4, group=64), "int4_mma_m16_n128_w4_g32": mma4(16, 128, 4, group=32),
        "int8_dot_m16_n64_w4": dot8(16, 64, 4), "int8_dot_m16_n128_w8": dot8(16, 128, 8),
        "decode_n64_w4_s3": decode(64, 4, 3), "decode_n128_w8_s2": decode(128, 8, 2),
    }


def compile_case(fn, ptrs, consts, warps, stages):
    if "PDL" in fn.arg_names:  # launched without programmatic dependent launch unless a case says so
        consts = {"PDL": False, **consts}
    if "ACCUMULATE" in fn.arg_names:
        consts = {"ACCUMULATE": False, **consts}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in DIV16 if a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward branch's body."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", l))}
    best = None
    for i, l in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", l)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    counts = collections.Counter()
    for l in lines[best[0]:best[1] + 1] if best else []:
        l = re.sub(r"^@!?U?P[0-9T]+\s+", "", re.sub(r"/\*[0-9a-f]+\*/", "", l).strip())
        if l and not l.startswith("."):
            counts[l.split()[0].rstrip(";")] += 1
    return counts


def main(argv: list[str]) -> int:
    want = argv[0] if argv else ""
    for name, (fn, ptrs, consts, warps, stages, loop_bytes) in _cases().items():
        if want not in name:
            continue
        compiled = compile_case(fn, ptrs, consts, warps, stages)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1]
            sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", usage).group(1)
        stack = re.search(r"STACK:(\d+)", usage).group(1)
        loop = hot_loop(sass)
        total = sum(loop.values())
        per_byte = total * 32 * warps / loop_bytes
        top = ", ".join(f"{op} {n}" for op, n in loop.most_common(8))
        print(f"{name:24s} regs {regs:>3s} stack {stack:>4s} | loop {total:4d} instr/thread, "
              f"{per_byte:5.2f} per byte | {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
