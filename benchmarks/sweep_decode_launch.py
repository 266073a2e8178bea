"""Decode attention under CUDA graphs: which launch serves every context length best.

A decode graph is captured before the contexts are known, so its attention launch (split count,
tile config, run-time split floor) is fixed per batch size while the context grows from a few
tokens to max_model_len; programs past a sequence's own split count exit at once, but they are
still launched. This sweep times, per head dim and batch size, every (launched splits, config,
floor) policy at several contexts (CUDA-graph replay, rotated KV so L2 holds none of it) and
ranks the policies by their worst ratio to the best time at each context.

    python benchmarks/sweep_decode_launch.py --out sweep.json      # on a CUDA machine, ~1-2 minutes
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import copies_for, time_per_op  # noqa: E402
from run_info import run_info  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="256,1024,4096,8192")
    ap.add_argument("--splits", default="4,8,16,32,64")
    ap.add_argument("--floors", default="128,256")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from engine.kernels.paged_decode_triton import _CONFIGS, paged_decode_attention_triton

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    device, dtype, hq, hkv, page = "cuda", torch.bfloat16, 32, 8, 16
    report = {"run": run_info(sys.argv), "cases": [], "ranking": []}
    t0 = time.perf_counter()
    for d, b in itertools.product(ints(args.head_dims), ints(args.batches)):
        times: dict[tuple, dict[int, float]] = {}
        for ctx in ints(args.contexts):
            r = copies_for(2 * b * ctx * hkv * d * 2)
            per_seq = ctx // page
            k_cache = torch.randn(r * b * per_seq, page, hkv, d, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            perm = torch.randperm(r * b * per_seq, device=device).to(torch.int32)
            tables = [perm[i * b * per_seq:(i + 1) * b * per_seq].view(b, per_seq) for i in range(r)]
            lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(b, hq, d, device=device, dtype=dtype)
            for s, ci, floor in itertools.product(ints(args.splits), range(len(_CONFIGS)), ints(args.floors)):
                fns = [lambda t=t: paged_decode_attention_triton(q, k_cache, v_cache, t, lens, d ** -0.5,
                                                                 num_splits=s, config=_CONFIGS[ci],
                                                                 min_split_tokens=floor) for t in tables]
                try:
                    ms = time_per_op(fns, args.repeats)
                except Exception as exc:  # a config that does not fit (shared memory): skip it
                    print(f"d={d} b={b} ctx={ctx} s={s} cfg={ci} floor={floor}: {type(exc).__name__}")
                    continue
                times.setdefault((s, ci, floor), {})[ctx] = ms
                report["cases"].append({"head_dim": d, "batch": b, "context": ctx, "splits": s,
                                        "config": _CONFIGS[ci], "floor": floor, "ms": ms})
            del k_cache, v_cache
        best = {ctx: min(t[ctx] for t in times.values() if ctx in t) for ctx in ints(args.contexts)}
        ranked = sorted((max(t[c] / best[c] for c in best), key) for key, t in times.items() if len(t) == len(best))
        print(f"head dim {d}, batch {b}: best per context " +
              ", ".join(f"{c}: {best[c] * 1e3:.1f} us" for c in best))
        for worst, (s, ci, floor) in ranked[:6]:
            row = times[(s, ci, floor)]
            print(f"  worst x{worst:.2f}  splits {s:2d} {_CONFIGS[ci]} floor {floor}: " +
                  ", ".join(f"{row[c] * 1e3:.1f}" for c in best))
            report["ranking"].append({"head_dim": d, "batch": b, "worst_ratio": worst, "splits": s,
                                      "config": _CONFIGS[ci], "floor": floor,
                                      "us": {str(c): row[c] * 1e3 for c in best}})
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
