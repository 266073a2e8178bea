"""Streaming throughput of a real `ember serve` process by its torch CPU thread count.

Starts `ember serve` (uvicorn, the real HTTP stack) on a free port for each value of
`--cpu-threads`, then for each count in `--streams` runs the project's load generator (the one
behind `ember bench serve`: streaming completions, random prompts of `--input-len` tokens,
`--tokens` out, ignore_eos) with that many requests all in flight at once, after a short warm-up.
The client runs on the same machine and takes CPU from the server too; compare runs of one call.

    python benchmarks/bench_serve.py --streams 1,8,64 --cpu-threads 2,1 --out serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import run_info, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(base: str, streams: int, tokens: int, input_len: int) -> dict:
    from clients.bench import BenchConfig, run_benchmark

    warm = BenchConfig(base_url=base, num_prompts=2, random_input_len=input_len, random_output_len=8)
    await run_benchmark(warm)
    cfg = BenchConfig(base_url=base, num_prompts=streams, max_concurrency=streams, random_input_len=input_len,
                      random_output_len=tokens)
    return await run_benchmark(cfg)


def serve(threads: int, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from ember_cli.main import main; sys.exit(main())", "serve", "--port", str(port), "--cpu-threads", str(threads),
           "--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("ember serve did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,8,64", help="comma-separated concurrent stream counts")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens a request")
    ap.add_argument("--input-len", type=int, default=16, help="prompt tokens a request")
    ap.add_argument("--cpu-threads", default="2,1", help="comma-separated --cpu-threads values, one server each")
    ap.add_argument("--serve-args", default="", help="more `ember serve` options, space-separated")
    ap.add_argument("--out", default="out/bench_serve.json")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    results = []
    for threads in [int(t) for t in args.cpu_threads.split(",")]:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = serve(threads, port, ["--max-num-seqs", str(max(streams))] + args.serve_args.split())
        try:
            wait_ready(base, proc)
            for n in streams:
                summary = asyncio.run(measure(base, n, args.tokens, args.input_len))
                results.append({"cpu_threads": threads, "streams": n, **summary})
                print(f"cpu threads {threads}, {n:3d} streams: {summary['output_throughput']:.0f} output tokens/s, "
                      f"{summary['completed']} completed", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    write_json(args.out, {"benchmark": "serve_streaming", **run_info(sys.argv), "settings": vars(args),
                          "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
