#!/usr/bin/env bash
# On a CUDA machine: check and measure a batch-1 decode change in one call (about 6 minutes on an H200
# for bf16 alone).
#   1. GPU tests of the decode path's kernels and the engine end to end
#   2. batch-1 decode, 1B and 8B shapes, with the switch under test off and on (one process each)
#   3. the 1B and 8B decode graphs' kernel tables (the switch on), for each dtype in PROFILE_DTYPES
# Usage: [DTYPES=bf16,int8,int4] [PROFILE_DTYPES=bf16 (none: "")] [REPEATS=3] [SKIP_TESTS=1] [TESTS="paths"]
#        scripts/gpu_decode_ab.sh OUTDIR SWITCH
#   (SWITCH e.g. EMBER_FOLD_NORMS or EMBER_PDL; default on = 1, off = 0)
set -uo pipefail
out=${1:-out/decode_ab}
switch=${2:-EMBER_FOLD_NORMS}
dtypes=${DTYPES:-bf16}
profile_dtypes=${PROFILE_DTYPES-bf16}
source "$(dirname "$0")/gpu_prologue.sh"

tests=${TESTS:-tests/engine/kernels/test_rope.py tests/engine/kernels/test_norm_activation.py \
  tests/engine/kernels/test_paged_attention.py tests/engine/kernels/test_quant_gemv_h2.py \
  tests/engine/kernels/test_quant_matmul.py tests/engine/test_gpu_e2e.py tests/engine/test_engine.py \
  tests/engine/test_cuda_graphs.py}
[ -n "${SKIP_TESTS:-}" ] || { phase tests; timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider $tests \
  2>&1 | tail -40 | tee "$out/pytest_gpu.txt"; }

for v in 0 1; do
  phase "decode $switch=$v"
  env "$switch=$v" timeout 240 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes "$dtypes" --repeats "${REPEATS:-3}" --no-hf --no-eager \
    --out "$out/decode_${switch}_$v.json" 2>&1 | tail -12 | tee "$out/bench_decode_${switch}_$v.txt"
done

for dtype in ${profile_dtypes//,/ }; do
  for shape in 1b 8b; do
    phase "profile $shape $dtype"
    timeout 120 python3 benchmarks/profile_decode.py --shape $shape --dtype "$dtype" \
      --out "$out/profile_${shape}_$dtype.json" 2>&1 | grep -v Warning | head -24 | tee "$out/profile_${shape}_$dtype.txt"
  done
done
phase done
