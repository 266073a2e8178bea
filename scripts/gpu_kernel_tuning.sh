#!/usr/bin/env bash
# On a CUDA machine (< 6 minutes on one H200): parity tests of the quantized-matmul and decode
# attention kernels at real shapes, then the kernel benchmark with its config sweeps. The sweep's
# winners are used for the rest of the run and written to OUTDIR/quant_tuned.{json,py}
# (commit the .py as engine/kernels/quant_tuned.py so later runs start from them).
# Usage: scripts/gpu_kernel_tuning.sh OUTDIR
set -uo pipefail
out=${1:-out}
source "$(dirname "$0")/gpu_prologue.sh"
total=${EMBER_TUNING_SECONDS:-340}  # the whole script's wall-clock budget
left() { echo $(( total - ($(date +%s) - start) )); }  # start: set by the prologue
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"

timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/engine/kernels/test_quant_matmul.py tests/engine/kernels/test_quant_codes.py tests/engine/kernels/test_quant_gemv_h2.py \
  tests/engine/kernels/test_quant_mma.py \
  tests/engine/kernels/test_paged_attention.py 2>&1 | tail -40 | tee "$out/pytest_gpu_kernels.txt"
echo "parity tests done, $(left) s left" | tee -a "$out/pytest_gpu_kernels.txt"

# The benchmark stops starting sweep trials after --budget-s and leaves ~70 s for the tables.
bench_left=$(( $(left) - 5 ))
timeout "$bench_left" python3 benchmarks/bench_kernels.py --sweep --budget-s $(( bench_left - 70 )) \
  --out "$out/bench_kernels.json" --tuned-out "$out/quant_tuned.json" 2>&1 | tee "$out/bench_kernels.txt"
echo "done in $(( $(date +%s) - start )) s"
