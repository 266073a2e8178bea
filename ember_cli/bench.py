"""`ember bench serve`: load-test a running server and report TTFT, TPOT, ITL, E2E and throughput."""
from __future__ import annotations

import argparse
import math


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running server")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    kinds.required = True
    p = kinds.add_parser("serve", help="serving load generator (like `vllm bench serve`)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from len*(1-r)..len*(1+r)")
    p.add_argument("--dataset-path", default=None, help="JSONL with {'prompt': ..., 'max_tokens': ...} per line")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="stop at EOS (default: generate the full output length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="also write the summary here as JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from dataclasses import fields

    from clients.bench import BenchConfig, format_table, run_benchmark

    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    summary = asyncio.run(run_benchmark(cfg))
    text = json.dumps(summary, indent=2)
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if args.json else format_table(summary))
    return 0 if summary["completed"] else 1
