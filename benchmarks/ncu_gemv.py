"""Batch-1 projections of the decode shapes, one launch each inside a profiler range, for Nsight
Compute: where a GEMV's time goes (DRAM throughput, warp stall reasons, occupancy) when CUDA
events give only its total.

Each case runs a few warm-up calls (Triton compiles, tuned configs load), then one call between
cudaProfilerStart / cudaProfilerStop, so `ncu --profile-from-start off` sees exactly the kernels
of that call. Cases: Ember's int4 / int8 kernels with the tuned config of the shape (residual add
in the epilogue where the decode path has one: o_proj, down_proj), cuBLAS bf16 `F.linear`, and
torch's tinygemm int4 kernel as references.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy --section LaunchStats --csv --page details \\
        python benchmarks/ncu_gemv.py            # on a CUDA machine; scripts/gpu_ncu_gemv.sh
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, K, N, residual add in the epilogue): 1B / 8B decode projections (q/k/v and gate/up fused)
SHAPES = [
    ("1b.qkv", 2048, 3072, False), ("1b.o", 2048, 2048, True), ("1b.gate_up", 2048, 16384, False),
    ("1b.down", 8192, 2048, True), ("8b.qkv", 4096, 6144, False), ("8b.o", 4096, 4096, True),
    ("8b.gate_up", 4096, 28672, False), ("8b.down", 14336, 4096, True),
]


def cases(kinds: list[str], names: list[str] | None) -> list[tuple[str, object]]:
    """(label, zero-argument launch) per shape and kind."""
    from engine.kernels.quant_matmul import int4_matmul, int8_matmul, quantize_int4, quantize_int8

    dev, out = torch.device("cuda"), []
    for name, k, n, add in SHAPES:
        if names and name not in names:
            continue
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        acc = torch.zeros(1, n, device=dev, dtype=torch.bfloat16) if add else None
        for kind in kinds:
            if kind == "int4":
                q, s = quantize_int4(w, 128, torch.bfloat16)
                out.append((f"{name}.int4", lambda x=x, q=q, s=s, a=acc: int4_matmul(x, q, s, accumulate=a)))
            elif kind == "int8":
                q, s = quantize_int8(w, torch.bfloat16)
                out.append((f"{name}.int8", lambda x=x, q=q, s=s, a=acc: int8_matmul(x, q, s, accumulate=a)))
            elif kind == "bf16":
                out.append((f"{name}.bf16", lambda x=x, w=w: F.linear(x, w)))
            elif kind == "tinygemm":
                raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
                packed = torch._convert_weight_to_int4pack(raw, 8)
                sz = torch.randn(k // 128, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
                out.append((f"{name}.tinygemm", lambda x=x, p=packed, sz=sz: torch._weight_int4pack_mm(x, p, 128, sz)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="int4,bf16,tinygemm", help="comma list of int4, int8, bf16, tinygemm")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    args = ap.parse_args(argv)
    todo = cases(args.kinds.split(","), [s for s in args.shapes.split(",") if s] or None)
    for label, fn in todo:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(label)
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        torch.cuda.nvtx.range_pop()
        print(label, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
