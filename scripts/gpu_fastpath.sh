#!/usr/bin/env bash
# On a CUDA machine: the engine's GPU fast path end to end, about 8 minutes on an H200.
#   1. GPU end-to-end tests (Triton path vs torch path, CUDA graphs vs eager, bf16 logits, KV sizing)
#   2. batch-1 decode benchmark: 1B and 8B shapes, bf16 / int8 / int4, roofline, HF generate
#   3. continuous-batching throughput benchmark: 1,000 requests, 1B and 8B shapes, HF static batches
#   4. docs/performance.md rendered from these results into OUTDIR (a preview)
# Each phase has its own time limit and leaves its log (and JSON) in OUTDIR whatever the others do.
# Usage: scripts/gpu_fastpath.sh OUTDIR
set -uo pipefail
out=${1:-out/fastpath}
source "$(dirname "$0")/gpu_prologue.sh"

phase info
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$out/gpu.txt"

phase tests
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_e2e.py tests/engine/test_engine.py \
  2>&1 | tail -60 | tee "$out/pytest_gpu_e2e.txt"

phase decode
timeout 200 python3 benchmarks/bench_decode.py --out "$out/decode.json" 2>&1 | tee "$out/bench_decode.txt"

phase decode-overlap
EMBER_OVERLAP_DECODE=1 timeout 120 python3 benchmarks/bench_decode.py --shapes 1b,8b --dtypes bf16 --no-hf --no-eager \
  --out "$out/decode_overlap.json" 2>&1 | tee "$out/bench_decode_overlap.txt"

phase throughput
timeout 210 python3 benchmarks/bench_throughput_gpu.py --out "$out/throughput.json" 2>&1 | tee "$out/bench_throughput.txt"

phase render
cp docs/performance.md "$out/performance.md"
python3 benchmarks/render_performance.py --results "$out" --doc "$out/performance.md" 2>&1 | tee -a "$out/phases.txt"
phase done
