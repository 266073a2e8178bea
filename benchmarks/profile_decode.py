"""Where a batch-1 decode step's time goes: GPU time per kernel and host time per engine phase.

Builds the same random-weight model as bench_decode.py, runs one request through the engine with
CUDA graphs (host phases, via bench_decode's StepTimer), then replays the batch-1 decode graph
under torch.profiler: kernels launched from a graph are traced one by one, so the table lists
every kernel of a step with its mean GPU time, grouped by name. Writes a text report (and JSON).
Under programmatic dependent launch (on by default on Hopper) a kernel's traced time starts at its
early launch and includes its wait for the previous kernel: profile with EMBER_PDL=0 for per-kernel
times, and read a PDL profile's step total only.

    python benchmarks/profile_decode.py --shape 1b --dtype bf16 --out prof.json    # on a CUDA machine
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode import BITS, StepTimer, build, engine_decode, make_engine, uses_pdl  # noqa: E402
from random_models import NAMES  # noqa: E402
from run_info import run_info, write_json  # noqa: E402


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int) -> list[dict]:
    """Mean GPU microseconds per step of each kernel name, over `replays` replays of the graph."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            entry = totals[ev.name]
            entry[0] += ev.device_time  # microseconds
            entry[1] += 1
    rows = [{"kernel": name, "us_per_step": t / replays, "launches_per_step": n / replays,
             "us_per_launch": t / n} for name, (t, n) in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(NAMES), default="1b")
    ap.add_argument("--dtype", choices=sorted(BITS), default="bf16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/profile_decode.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    model = build(args.shape, args.dtype, "cuda", args.seed)
    engine = make_engine(model, "cuda")
    timer = StepTimer(engine)
    result = engine_decode(engine, args.prompt_len, args.output_len, 1, random.Random(args.seed))
    steps = result["runs"][0]["steps"]
    phases = timer.per_step_ms(steps)
    rows = kernel_table(engine.runner.graphs.graphs[1], args.replays)
    gpu_us = sum(r["us_per_step"] for r in rows)
    launches = sum(r["launches_per_step"] for r in rows)
    print(f"{NAMES[args.shape]} {args.dtype}: {result['tokens_per_s']:.1f} tok/s, "
          f"{1e3 / result['tokens_per_s']:.3f} ms a step; host phases (ms/step): {phases}")
    pdl = uses_pdl("cuda")
    print(f"decode graph: {launches:.0f} kernels a step, {gpu_us:.0f} us of kernel time a step"
          + (" (PDL on: kernel times include waits; EMBER_PDL=0 for per-kernel times)" if pdl else ""))
    print(f"{'us/step':>9} {'n':>5} {'us each':>8}  kernel")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} {r['launches_per_step']:5.0f} {r['us_per_launch']:8.2f}  {r['kernel'][:110]}")
    write_json(args.out, {"benchmark": "profile_decode", **run_info(sys.argv), "settings": vars(args),
                          "tokens_per_s": result["tokens_per_s"], "host_phases_ms_per_step": phases,
                          "kernel_us_per_step": gpu_us, "kernels_per_step": launches, "pdl": pdl, "kernels": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
