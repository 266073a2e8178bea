#!/usr/bin/env bash
# On a CUDA machine: kernel parity tests at real shapes, then the kernel benchmarks.
# Usage: scripts/gpu_kernels.sh OUTDIR
set -uo pipefail
out=${1:-out}
source "$(dirname "$0")/gpu_prologue.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
python3 -m pytest -q -m gpu tests/engine/kernels -x -p no:cacheprovider 2>&1 | tail -40 | tee "$out/pytest_gpu_kernels.txt"
python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.txt"
