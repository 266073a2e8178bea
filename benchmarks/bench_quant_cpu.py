"""Weight-only int8 / int4 linear layers on the CPU, over token counts M: the two ways of
engine/kernels/quant_matmul_cpu.py (torch's packed row-by-row kernels; the weight dequantized to
the activations' dtype, then a dense matmul), the dequantize-to-fp32 references, and a dense
nn.Linear in the same dtype. Best of `--repeats` calls after one untimed.

    python benchmarks/bench_quant_cpu.py --shapes 256:768,2048:8192 --ms 1,16,64,256,2048 --out q.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from run_info import best_ms, run_info, write_json  # noqa: E402

from engine.checkpoint import parse_dtype  # noqa: E402
from engine.kernels.quant_matmul import int4_matmul_ref, int8_matmul_ref, quantize_int4, quantize_int8  # noqa: E402
import engine.kernels.quant_matmul_cpu as qcpu  # noqa: E402


def cpu_ms(fn, x, q, s, dense: bool, repeats: int) -> float:
    """One of quant_matmul_cpu's two ways, forced by its row threshold."""
    saved = qcpu.INT8_DENSE_MIN_ROWS, qcpu.INT4_DENSE_MIN_ROWS
    qcpu.INT8_DENSE_MIN_ROWS = qcpu.INT4_DENSE_MIN_ROWS = 0 if dense else 1 << 62
    try:
        return best_ms(lambda: fn(x, q, s), repeats)
    finally:
        qcpu.INT8_DENSE_MIN_ROWS, qcpu.INT4_DENSE_MIN_ROWS = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256:768,2048:8192", help="K:N (in:out features) pairs")
    ap.add_argument("--ms", default="1,16,64,256,2048", help="token counts")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/bench_quant_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split(":"))
        w = (torch.randn(n, k) * 0.02).to(dtype)
        q8, s8 = quantize_int8(w, dtype)
        q4, s4 = quantize_int4(w, args.group_size, dtype)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k).to(dtype)
            row = {"K": k, "N": n, "M": m, "dense_ms": best_ms(lambda: F.linear(x, w), args.repeats)}
            for bits, fn, q, s, ref in ((8, qcpu.int8_matmul_cpu, q8, s8, int8_matmul_ref),
                                        (4, qcpu.int4_matmul_cpu, q4, s4, int4_matmul_ref)):
                row[f"int{bits}_packed_ms"] = cpu_ms(fn, x, q, s, False, args.repeats)
                row[f"int{bits}_dequant_dense_ms"] = cpu_ms(fn, x, q, s, True, args.repeats)
                row[f"int{bits}_reference_ms"] = best_ms(lambda: ref(x, q, s), args.repeats)
            rows.append(row)
            print(f"K {k:5d} N {n:5d} M {m:5d}  dense {row['dense_ms']:8.3f}  " + "  ".join(
                f"int{b} packed {row[f'int{b}_packed_ms']:8.3f} dequant+dense {row[f'int{b}_dequant_dense_ms']:8.3f}"
                f" ref {row[f'int{b}_reference_ms']:8.3f}" for b in (8, 4)) + " ms")
    write_json(args.out, {"benchmark": "quant_cpu", **run_info(sys.argv), "settings": vars(args), "rows": rows,
                          "dense_min_rows": {"int8": qcpu.INT8_DENSE_MIN_ROWS, "int4": qcpu.INT4_DENSE_MIN_ROWS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
