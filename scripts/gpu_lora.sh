#!/usr/bin/env bash
# On a CUDA machine (about 9 minutes on an H200): multi-LoRA serving's GPU tests, then its throughput
# benchmark on the 1B and 8B shapes (1, 8 and 32 distinct rank-16 adapters against the base model).
# Copy OUTDIR/multi_lora_{1b,8b}.json to benchmarks/results/multi-lora-h200.json and
# multi-lora-8b-h200.json, then run `python benchmarks/render_performance.py`.
# Usage: scripts/gpu_lora.sh OUTDIR
set -uo pipefail
out=${1:-out/lora}
source "$(dirname "$0")/gpu_prologue.sh"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/kernels/test_lora_batched.py \
  tests/engine/test_lora_serving.py tests/engine/kernels/test_paged_attention.py \
  tests/engine/kernels/test_norm_activation.py tests/engine/test_fused_path.py 2>&1 | tail -20 | tee "$out/pytest_gpu_lora.txt"
timeout 200 python3 benchmarks/bench_multi_lora.py --device cuda --shape llama-1b --shrink-ab --json-out "$out/multi_lora_1b.json" \
  2>&1 | grep -v '^engine\.' | tee "$out/multi_lora_1b.txt"
timeout 200 python3 benchmarks/bench_multi_lora.py --device cuda --shape llama-8b --repeats 2 \
  --json-out "$out/multi_lora_8b.json" 2>&1 | grep -v '^engine\.' | tee "$out/multi_lora_8b.txt"
# A/B: synchronous decode steps (overlapped decode off) at the largest adapter count.
EMBER_OVERLAP_DECODE=0 timeout 120 python3 benchmarks/bench_multi_lora.py --device cuda --shape llama-1b \
  --adapter-counts 32 --repeats 2 --json-out "$out/multi_lora_1b_sync.json" 2>&1 | grep -v '^engine\.' | tee "$out/multi_lora_1b_sync.txt"
