"""CPU paged decode attention: the batched torch path (engine/kernels/paged_attention_cpu.py) against
the per-sequence reference it replaces, over a grid of batch sizes and context lengths.

Each case fills a paged cache (blocks in random order, like a pool after some churn), draws its
sequences' context lengths uniformly from the case's range, and times one decode call of each
path (one query per sequence), alternating, best of `--repeats`. Runs anywhere (CPU only).

    python benchmarks/bench_attention_cpu.py --out out/attention-cpu.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from run_info import best_ms, run_info, write_json  # noqa: E402

from engine.checkpoint import parse_dtype  # noqa: E402
from engine.kernels.paged_attention import paged_attention_ref  # noqa: E402
from engine.kernels.paged_attention_cpu import paged_attention_cpu  # noqa: E402


def case_inputs(batch: int, lo: int, hi: int, hq: int, hkv: int, d: int, page: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=gen, dtype=torch.int32)
    width = -(-hi // page)
    num_blocks = batch * width + 64
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width).to(torch.int32)
    q = torch.randn(batch, hq, d, generator=gen).to(dtype)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    return q, k_cache, v_cache, tables, lens, cu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--contexts", default="8:72,16:192,64:512,512:2048", help="LO:HI context ranges")
    ap.add_argument("--heads", default="8:4:32", help="Hq:Hkv:D (the bundled model's)")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (ember serve on 2 cores uses 1)")
    ap.add_argument("--out", default="out/bench_attention_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hq, hkv, d = (int(x) for x in args.heads.split(":"))
    dtype = parse_dtype(args.dtype)
    scale = 1 / math.sqrt(d)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for ctx in args.contexts.split(","):
            lo, hi = (int(x) for x in ctx.split(":"))
            inputs = case_inputs(batch, lo, hi, hq, hkv, d, args.page, dtype, seed=batch * 7919 + hi)
            ref = best_ms(lambda: paged_attention_ref(*inputs, scale), args.repeats)
            new = best_ms(lambda: paged_attention_cpu(*inputs, scale), args.repeats)
            rows.append({"batch": batch, "context": [lo, hi], "reference_ms": ref, "batched_ms": new,
                         "speedup": ref / new})
            print(f"batch {batch:4d}  context {lo:4d}-{hi:<5d}  reference {ref:8.3f} ms  batched {new:8.3f} ms"
                  f"  {ref / new:5.2f}x")
    write_json(args.out, {"benchmark": "attention_cpu", **run_info(sys.argv), "settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
