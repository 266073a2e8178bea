"""Dense bf16 projections at decode-sized M: the split-K Triton kernel against cuBLAS (F.linear).

Shapes are the projections of the Llama-3.2-1B and Llama-3.1-8B shapes as the fused model runs
them (q/k/v and gate/up merged). Each case rotates enough weight copies to defeat the L2 cache and
times a CUDA graph of the calls (bench_kernels.time_per_op), so the figures are per-kernel GPU
time at the rate a decode graph sees. Decides whether EMBER_DENSE_GEMV should be on.

    python benchmarks/bench_dense_gemv.py --out dense_gemv.json        # on a CUDA machine, < 1 min
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import copies_for, time_per_op  # noqa: E402
from run_info import run_info, write_json  # noqa: E402

from engine.kernels.dense_gemv_triton import dense_gemv_triton  # noqa: E402

SHAPES = {  # name: (N out, K in)
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="out/bench_dense_gemv.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dense_gemv needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    print(f"{'shape':<12}{'M':>3}{'MB':>8}{'cuBLAS us':>11}{'TB/s':>7}{'triton us':>11}{'TB/s':>7}{'speed-up':>10}")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = copies_for(nbytes)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            torch.testing.assert_close(dense_gemv_triton(x, ws[0]), F.linear(x, ws[0]), rtol=2e-2, atol=2e-2)
            cublas = time_per_op([lambda w=w: F.linear(x, w) for w in ws], args.repeats) * 1e3
            triton_us = time_per_op([lambda w=w: dense_gemv_triton(x, w) for w in ws], args.repeats) * 1e3
            row = {"shape": name, "m": m, "n": n, "k": k, "weight_mb": nbytes / 1e6, "cublas_us": cublas,
                   "triton_us": triton_us, "cublas_tbs": nbytes / cublas / 1e6, "triton_tbs": nbytes / triton_us / 1e6,
                   "speedup": cublas / triton_us}
            rows.append(row)
            print(f"{name:<12}{m:>3}{nbytes / 1e6:>8.1f}{cublas:>11.1f}{row['cublas_tbs']:>7.2f}{triton_us:>11.1f}"
                  f"{row['triton_tbs']:>7.2f}{row['speedup']:>9.2f}x")
        del ws
        torch.cuda.empty_cache()
    write_json(args.out, {"benchmark": "dense_gemv", **run_info(sys.argv), "gpu": torch.cuda.get_device_name(),
                          "settings": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
