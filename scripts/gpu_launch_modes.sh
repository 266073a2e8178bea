#!/usr/bin/env bash
# On a CUDA machine (about 5 minutes on one H200): batch-1 decode of the 1B and 8B shapes under each
# launch mode, one process per mode, so the modes are compared on one machine in one call:
#   PDL off / on (small kernels trigger early, GEMVs at exit) / all early / all at exit, norms folded;
#   norms not folded with PDL off (isolates folding); an int8 and an int4 lm_head (PDL off, norms
#   folded; the other rows keep it in bf16); then the GPU end-to-end tests and the
#   packed-half GEMV with a two- and a three-step ring (benchmarks/bench_gemv_ring.py).
# Usage: [DTYPES=int4] [REPEATS=1] scripts/gpu_launch_modes.sh OUTDIR
set -uo pipefail
out=${1:-out/launch_modes}
dtypes=${DTYPES:-int4}
source "$(dirname "$0")/gpu_prologue.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
i=0
for mode in "EMBER_PDL=0" "EMBER_PDL=1" "EMBER_PDL=1 EMBER_PDL_TRIGGER=early" "EMBER_PDL=1 EMBER_PDL_TRIGGER=exit" \
            "EMBER_PDL=0 EMBER_FOLD_NORMS=0" "EMBER_PDL=0 --lm-head-bits 8" "EMBER_PDL=0 --lm-head-bits 4"; do
  i=$((i + 1))
  echo "== $mode" | tee -a "$out/summary.txt"
  envs=${mode%%--*} extra=""
  [ "$envs" = "$mode" ] || extra="--${mode#*--}"
  env $envs timeout 150 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes "$dtypes" $extra \
    --repeats "${REPEATS:-1}" --no-hf --no-eager --out "$out/decode_$i.json" 2>&1 | grep "tok/s" | tee -a "$out/summary.txt"
done
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_e2e.py 2>&1 | tail -5 \
  | tee "$out/pytest_gpu_e2e.txt"
timeout 90 python3 benchmarks/bench_gemv_ring.py 2>&1 | tee "$out/gemv_ring.txt"
