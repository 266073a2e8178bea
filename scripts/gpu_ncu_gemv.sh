#!/usr/bin/env bash
# On a CUDA machine with Nsight Compute: the batch-1 decode projections (benchmarks/ncu_gemv.py)
# under ncu. Two passes: raw metrics (duration, DRAM bytes and throughput, instructions, registers,
# every warp stall reason per issued instruction) as CSV, then the details page of a few sections
# (throughput, occupancy, launch, warp states, scheduler, memory). The raw pass has run on an H100
# (3 shapes x 2 kinds within a 43 s call, benchmarks/results/ncu-gemv-h100.csv); the details pass
# has not run yet.
# Usage: [KINDS=int4,bf16,tinygemm] [SHAPES=8b.gate_up,...] scripts/gpu_ncu_gemv.sh OUTDIR
set -uo pipefail
out=${1:-out/ncu_gemv}
source "$(dirname "$0")/gpu_prologue.sh"
args=(--kinds "${KINDS:-int4,bf16,tinygemm}" --shapes "${SHAPES:-}")
common=(--profile-from-start off --clock-control none --csv)
timeout 240 ncu "${common[@]}" --page raw --metrics \
gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,\
launch__grid_size,launch__block_size,launch__occupancy_limit_registers,smsp__issue_active.avg.pct_of_peak_sustained_active,\
regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
  python3 benchmarks/ncu_gemv.py "${args[@]}" > "$out/ncu_raw.csv" 2> "$out/ncu_raw.err"
timeout 240 ncu "${common[@]}" --page details --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  python3 benchmarks/ncu_gemv.py "${args[@]}" > "$out/ncu_details.csv" 2> "$out/ncu_details.err"
tail -3 "$out"/ncu_raw.err "$out"/ncu_details.err
wc -l "$out"/ncu_*.csv
