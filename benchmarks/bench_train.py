"""Pretraining throughput: tokens/s and MFU of one optimizer step loop on one GPU (random tokens).

    python benchmarks/bench_train.py --config configs/small.yaml --compile --json out.json

Runs Ember's real training step (Trainer: bf16 autocast, fused AdamW, clipping) on the config's model
with random token batches, times each step with CUDA events after warm-up, and reports the median.
MFU uses training/flops.py's convention (6 x matmul weights + full-attention term per token) against the
datasheet bf16 peak, and the same FLOP rate against a bf16 8192^3 matmul measured in this run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model import Transformer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.flops import flops_per_token, peak_tflops  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.schedule import build_scheduler  # noqa: E402
from training.trainer import Trainer, resolve_precision  # noqa: E402


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """bf16 n^3 matmul rate on this GPU (median of timed iterations), the achievable-peak baseline."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
        return out or "unknown"
    except OSError:
        return "unknown"


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.override)
    device = torch.device("cuda")
    seq, mbs = args.seq_len or cfg.data.seq_len, args.micro_batch or cfg.data.micro_batch_size
    with device:
        model = Transformer(cfg.model)
    model.init_weights(0)
    model.gradient_checkpointing = args.grad_ckpt
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, args.steps + args.warmup + 1)
    step_model = torch.compile(model) if args.compile else model
    trainer = Trainer(step_model, optimizer, scheduler, precision=resolve_precision("bf16", device),
                      max_grad_norm=1.0)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        ids = torch.randint(0, cfg.model.vocab_size, (mbs, seq + 1), device=device, generator=gen)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        batches = [batch() for _ in range(args.accum)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trainer.step(batches)
        end.record()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
    step_s = statistics.median(times)
    tokens = mbs * seq * args.accum
    tps = tokens / step_s
    fpt = flops_per_token(cfg.model, seq)
    achieved = tps * fpt / 1e12
    peak = peak_tflops(device)
    mm = matmul_tflops()
    return {
        "benchmark": "train_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "config": args.config, "overrides": args.override,
        "params": cfg.model.num_parameters(), "seq_len": seq, "micro_batch": mbs, "grad_accum": args.accum,
        "compile": args.compile, "gradient_checkpointing": args.grad_ckpt, "precision": "bf16 autocast, fp32 master",
        "steps_timed": len(times), "step_s_median": step_s, "tokens_per_s": tps,
        "flops_per_token": fpt, "achieved_tflops": achieved, "peak_tflops_datasheet": peak,
        "mfu_vs_datasheet": achieved / peak if peak else None, "matmul_tflops_measured": mm,
        "ratio_vs_measured_matmul": achieved / mm, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the config's data.micro_batch_size")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per timed step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train needs a CUDA GPU")
    res = run(args)
    print(f"{res['gpu']}  {res['params'] / 1e6:.0f}M params  seq {res['seq_len']} x batch {res['micro_batch']}"
          f"{'  compiled' if res['compile'] else ''}")
    print(f"  step {res['step_s_median'] * 1e3:8.1f} ms   {res['tokens_per_s']:>10,.0f} tokens/s   "
          f"{res['achieved_tflops']:.0f} TFLOP/s   MFU {res['mfu_vs_datasheet'] or 0:.1%} of datasheet   "
          f"{res['ratio_vs_measured_matmul']:.1%} of measured matmul ({res['matmul_tflops_measured']:.0f})   "
          f"peak mem {res['max_memory_gib']:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
