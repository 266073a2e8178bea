#!/usr/bin/env bash
# On a CUDA machine (3 minutes on an H100 with SWEEP_S=60 SWEEP_BITS=4, 7 shapes, ROUNDS=1, NCU=0; the
# defaults take longer): measure new int4 / int8 GEMV launch shapes on the decode shapes and keep
# the evidence.
#   1. bench_kernels.py --only quant --model-shapes --sweep: every candidate on the decode
#      projections; the winners go to OUTDIR/tuned.json (not into the committed table)
#   2. batch-1 decode, committed table vs the sweep's (EMBER_QUANT_TUNING), alternating
#   3. the GPU tests of the packed-half GEMV
#   4. the decode projections under Nsight Compute with the sweep's winners (scripts/gpu_ncu_gemv.sh)
# Usage: [DTYPES=int4,int8] [SWEEP_S=150] [SWEEP_BITS=8,4] [SHAPES=K:N,...] [ROUNDS=2] [TESTS="-k pattern"]
#        [NCU=0] scripts/gpu_gemv_sweep_ab.sh OUTDIR
set -uo pipefail
out=${1:-out/gemv_sweep_ab}
source "$(dirname "$0")/gpu_prologue.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"

phase sweep
timeout $(( ${SWEEP_S:-150} + 60 )) python3 benchmarks/bench_kernels.py --only quant --model-shapes --sweep \
  --budget-s "${SWEEP_S:-150}" --sweep-bits "${SWEEP_BITS:-8,4}" --shapes "${SHAPES:-}" --repeats 20 \
  --out "$out/kernels_sweep.json" --tuned-out "$out/tuned.json" 2>&1 \
  | tail -16 | tee "$out/kernels_sweep.txt"

for round in $(seq 1 "${ROUNDS:-2}"); do
  for arm in committed sweep; do
    phase "decode $arm $round"
    if [ $arm = sweep ]; then tuning="$out/tuned.json"; else tuning=""; fi
    EMBER_QUANT_TUNING=$tuning timeout 150 python3 benchmarks/bench_decode.py --shapes 1b,8b \
      --dtypes "${DTYPES:-int4}" --repeats 1 --no-hf --no-eager --out "$out/decode_${arm}_$round.json" 2>&1 \
      | grep "tok/s" | sed "s/^/$arm $round  /" | tee -a "$out/decode_ab.txt"
  done
done

phase tests
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/kernels/test_quant_gemv_h2.py ${TESTS:-} \
  2>&1 | tail -8 | tee "$out/pytest_gpu.txt"

[ "${NCU:-1}" = 0 ] || { phase ncu; EMBER_QUANT_TUNING="$out/tuned.json" KINDS=int4 timeout 120 scripts/gpu_ncu_gemv.sh "$out/ncu"; }
phase done
