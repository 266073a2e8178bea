#!/usr/bin/env bash
# On a CUDA machine (about 6 minutes on an H200): the GPU tests of the quantized decode path, then
# the full batch-1 decode table (HF generate included) and its int8- and int4-head variants, and the
# kernel tables (fixed shapes with attention; the decode projections), the JSON that
# benchmarks/render_performance.py turns into docs/performance.md's tables.
# Usage: scripts/gpu_final_check.sh OUTDIR
set -uo pipefail
out=${1:-out/final_check}
source "$(dirname "$0")/gpu_prologue.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/kernels/test_quant_gemv_h2.py \
  tests/engine/kernels/test_quant_matmul.py tests/engine/test_gpu_e2e.py 2>&1 | tail -5 | tee "$out/pytest_gpu.txt"
timeout 200 python3 benchmarks/bench_decode.py --out "$out/decode.json" 2>&1 | grep -E "tok/s|bandwidth" \
  | tee -a "$out/summary.txt"
for head in 8 4; do
  timeout 100 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes int8,int4 --lm-head-bits $head --no-hf \
    --no-eager --out "$out/decode_head$head.json" 2>&1 | grep "tok/s" | tee -a "$out/summary.txt"
done
timeout 150 python3 benchmarks/bench_kernels.py --out "$out/kernels.json" 2>&1 | tail -30 > "$out/kernels.txt"
timeout 100 python3 benchmarks/bench_kernels.py --only quant --model-shapes --out "$out/kernels_model_shapes.json" 2>&1 \
  | tail -14 > "$out/kernels_model_shapes.txt"
