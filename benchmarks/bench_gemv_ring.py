"""The packed-half int4 / int8 GEMV (M = 1) with a two- and a three-step ring of weights, timed in one
process on the GPU: CUDA-graph replay of rotated inputs (bench_kernels.time_per_op), the layer's
weights read once a call. Prints microseconds and TB/s of weight bytes per (shape, ring depth).

    python benchmarks/bench_gemv_ring.py [--bits 4] [--repeats 30]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import time_per_op  # noqa: E402

from engine.kernels.quant_matmul import quantize_int4, quantize_int8  # noqa: E402
from engine.kernels.quant_matmul_triton import quant_matmul_triton  # noqa: E402
from engine.kernels.quant_tuning import tile_config  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 28672), (4096, 6144)]  # (K, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  int{args.bits} GEMV, M = 1: "
          "the tuned (or default) config, ring depth 2 vs 3")
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = quantize_int4(w, 128, torch.bfloat16) if args.bits == 4 else quantize_int8(w, torch.bfloat16)
        nbytes = q.numel() * q.element_size() + s.numel() * s.element_size()
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        base = replace(tile_config(1, n, k, args.bits, 128 if args.bits == 4 else None), kernel="gemv_h2")
        row = []
        for depth in (2, 3):
            cfg = replace(base, prefetch=depth)
            ms = time_per_op([lambda x=x, c=cfg: quant_matmul_triton(x, q, s, None, args.bits, c) for x in xs],
                             args.repeats)
            row.append(f"depth {depth}: {ms * 1e3:6.1f} us {nbytes / ms / 1e9:5.2f} TB/s")
        launch = f"({base.block_n} rows, {base.num_warps} warps, waves {base.waves})"
        print(f"  K {k:5d} N {n:5d} {launch}  " + "   ".join(row))


if __name__ == "__main__":
    main()
