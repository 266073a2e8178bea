#!/usr/bin/env bash
# On a CUDA machine (about 7 minutes): the batch-1 dense GEMV's kernel tests, its launch-shape sweep
# against cuBLAS on the decode projections of the 1B and 8B shapes (the winners go to
# OUT/dense_tuned.json and .py), batch-1 bf16 decode with the GEMV off and on (the sweep's table in
# both arms, each arm twice in alternating order), then the end-to-end GPU tests that run it.
# Most telling first: a run cut short keeps what it wrote.
# Usage: scripts/gpu_dense_gemv.sh OUTDIR
set -uo pipefail
out=${1:-out/dense_gemv}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 EMBER_COMMIT=${EMBER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/kernels/test_dense_gemv.py 2>&1 | tail -3 \
  | tee "$out/pytest_gpu.txt"
timeout 180 python3 benchmarks/bench_kernels.py --only dense --sweep --budget-s 110 --out "$out/dense.json" \
  --tuned-out "$out/dense_tuned.json" 2>&1 | tail -14 | tee "$out/dense.txt"
export EMBER_QUANT_TUNING="$out/dense_tuned.json"
for arm in 0 1 0 1; do
  EMBER_DENSE_GEMV=$arm timeout 100 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes bf16 --no-hf \
    --no-eager --out "$out/decode_gemv$arm.json" 2>&1 | grep "tok/s" | sed "s/^/gemv=$arm /" \
    | tee -a "$out/decode_ab.txt"
done
unset EMBER_QUANT_TUNING
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_e2e.py \
  -k "logits or programmatic or triton_path" 2>&1 | tail -3 | tee -a "$out/pytest_gpu.txt"
