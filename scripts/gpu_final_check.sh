#!/usr/bin/env bash
# On a CUDA machine (about 4 minutes): the GEMV trigger modes of programmatic dependent launch side by
# side (default: GEMVs trigger at exit; EMBER_PDL_TRIGGER=bytes: GEMVs of at most 16 MiB trigger early),
# two rounds, int4 and int8, 1B and 8B shapes; then, on an H200, the full decode table (HF included)
# and the int4 / int8-head variants for docs/performance.md.
# Usage: scripts/gpu_final_check.sh OUTDIR
set -uo pipefail
out=${1:-out/final_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 EMBER_COMMIT=${EMBER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu" | tee "$out/gpu.txt"
for round in 1 2; do
  for trigger in "" bytes; do
    echo "== round $round EMBER_PDL_TRIGGER=${trigger:-<default>}" | tee -a "$out/summary.txt"
    EMBER_PDL_TRIGGER=$trigger timeout 100 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes int4,int8 \
      --repeats 1 --no-hf --no-eager --out "$out/trigger_${trigger:-default}_$round.json" 2>&1 | grep "tok/s" \
      | tee -a "$out/summary.txt"
  done
done
case "$gpu" in
  *H200*)
    timeout 200 python3 benchmarks/bench_decode.py --out "$out/decode.json" 2>&1 | grep "tok/s" | tee -a "$out/summary.txt"
    for head in 8 4; do
      timeout 100 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes int4 --lm-head-bits $head --no-hf \
        --no-eager --out "$out/decode_head$head.json" 2>&1 | grep "tok/s" | tee -a "$out/summary.txt"
    done ;;
esac
