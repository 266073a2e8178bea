"""Measured launch winners of the weight-only matmuls (see quant_tuning.py for the lookup).

Written by `benchmarks/bench_kernels.py --sweep` on NVIDIA H200, 2026-11-28, commit 0272fa7; the
entries after the marker below (M = 1 on the 1B and 8B decode projections that the fixed shapes do
not cover) by `benchmarks/bench_kernels.py --only quant --model-shapes --sweep` on NVIDIA H100 80GB
HBM3, 2026-12-07, commit 7cfa23d.
"""

TUNED: dict[str, dict] = {
    'int4/g128/m1/k14336/n4096': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 8, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k4096/n14336': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 6, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k4096/n4096': {'block_m': 1, 'block_n': 128, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 0, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m16/k14336/n4096': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m16/k4096/n14336': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m16/k4096/n4096': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m4/k14336/n4096': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m4/k4096/n14336': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m4/k4096/n4096': {'block_m': 16, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m64/k14336/n4096': {'block_m': 64, 'block_n': 128, 'num_warps': 8, 'num_stages': 3, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': True},
    'int4/g128/m64/k4096/n14336': {'block_m': 64, 'block_n': 128, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 1, 'min_steps': 2, 'w_is_a': True},
    'int4/g128/m64/k4096/n4096': {'block_m': 64, 'block_n': 128, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'mma', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': True},
    'int8/g0/m1/k14336/n4096': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k4096/n14336': {'block_m': 1, 'block_n': 32, 'num_warps': 1, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 8, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k4096/n4096': {'block_m': 1, 'block_n': 128, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m16/k14336/n4096': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m16/k4096/n14336': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 256, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m16/k4096/n4096': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m4/k14336/n4096': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m4/k4096/n14336': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': 1, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m4/k4096/n4096': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m64/k14336/n4096': {'block_m': 64, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m64/k4096/n14336': {'block_m': 64, 'block_n': 128, 'num_warps': 4, 'num_stages': 3, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m64/k4096/n4096': {'block_m': 64, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    # M = 1, decode projections (H100 sweep)
    'int4/g128/m1/k2048/n128256': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 3, 'block_k': 128, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k2048/n16384': {'block_m': 1, 'block_n': 128, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k2048/n2048': {'block_m': 1, 'block_n': 128, 'num_warps': 8, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k2048/n3072': {'block_m': 1, 'block_n': 128, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 0, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k4096/n128256': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 3, 'block_k': 128, 'waves': 8, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k4096/n28672': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 6, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k4096/n6144': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 6, 'min_steps': 2, 'w_is_a': False},
    'int4/g128/m1/k8192/n2048': {'block_m': 1, 'block_n': 64, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k2048/n128256': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 256, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k2048/n16384': {'block_m': 1, 'block_n': 64, 'num_warps': 2, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv_h2', 'prefetch': 2, 'block_k': 128, 'waves': 8, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k2048/n2048': {'block_m': 1, 'block_n': 128, 'num_warps': 8, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k2048/n3072': {'block_m': 1, 'block_n': 64, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k4096/n128256': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 256, 'waves': 1, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k4096/n28672': {'block_m': 1, 'block_n': 128, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k4096/n6144': {'block_m': 1, 'block_n': 64, 'num_warps': 4, 'num_stages': 1, 'split_k': None, 'kernel': 'gemv', 'prefetch': 2, 'block_k': 128, 'waves': 4, 'min_steps': 2, 'w_is_a': False},
    'int8/g0/m1/k8192/n2048': {'block_m': 16, 'block_n': 64, 'num_warps': 4, 'num_stages': 4, 'split_k': None, 'kernel': 'dot', 'prefetch': 2, 'block_k': 128, 'waves': 2, 'min_steps': 2, 'w_is_a': False},
}
