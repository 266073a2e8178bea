"""Measured launch winners of the weight-only matmuls (see quant_tuning.py for the lookup).

Written by `benchmarks/bench_kernels.py --sweep` (its quant_tuned.py output), one entry per
(bits, group, M bucket, K, N): "int{bits}/g{group}/m{bucket}/k{K}/n{N}" -> TileConfig fields.
Empty until the first sweep on the target GPU has been committed.
"""

TUNED: dict[str, dict] = {}
