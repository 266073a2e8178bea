"""Where a multi-adapter decode step's GPU time goes: real engine steps against replays of their graph.

bench_multi_lora.py times a batch-64 decode step with 32 adapters well above one replay of its
CUDA graph on its own. This profiles both under torch.profiler: `--steps` real engine decode steps
(host preparation, input copies, the graph, sampling) and as many back-to-back replays of the
graph the last step ran. Per run: kernels by name (GPU us a step), the sum of kernel time a step
and the span from the first kernel's start to the last one's end a step (span minus sum = GPU idle
inside the step).

    python benchmarks/profile_lora_step.py --shape llama-1b --adapters 32 --out prof_lora.json   # CUDA only
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_multi_lora import LastGraph, build_model  # noqa: E402
from run_info import run_info, write_json  # noqa: E402

from engine.adapter_testing import write_random_adapter  # noqa: E402
from engine.adapters import AdapterServingConfig  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def profiled(fn, steps: int) -> dict:
    """Run fn() `steps` times under the profiler; kernel time per step by name, and the per-step span."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    starts, ends = [], []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            totals[ev.name][0] += ev.device_time
            totals[ev.name][1] += 1
            starts.append(ev.time_range.start)
            ends.append(ev.time_range.end)
    rows = sorted(({"kernel": k, "us_per_step": t / steps, "launches_per_step": n / steps}
                   for k, (t, n) in totals.items()), key=lambda r: -r["us_per_step"])
    return {"kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "span_us_per_step": (max(ends) - min(starts)) / steps if starts else 0.0, "kernels": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="out/profile_lora_step.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_lora_step needs a CUDA GPU", file=sys.stderr)
        return 2
    model = build_model(args.shape, "cuda", torch.bfloat16, 0)
    with tempfile.TemporaryDirectory() as root:
        names = [f"adapter-{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            write_random_adapter(model, Path(root) / name, r=args.rank, alpha=2 * args.rank, seed=i, strength=0.05)
        config = EngineConfig(model="", device="cuda", max_num_seqs=args.batch, kv_cache_tokens=args.batch * 512,
                              max_num_batched_tokens=4096, max_model_len=480, enable_prefix_caching=False)
        engine = Engine(config, model=model, tokenizer=None,
                        adapters=AdapterServingConfig(lora_root=root, max_loras=args.adapters,
                                                      max_lora_rank=args.rank))
        for name in names:
            engine.adapters.load(name, name)
        last = LastGraph(engine)
        params = SamplingParams(max_tokens=4 * args.steps + 64, temperature=0.0, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        for i in range(args.batch):
            prompt = torch.randint(3, model.config.vocab_size, (128,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, params, lora=names[i % args.adapters])
        for _ in range(16):  # the prefill steps, then a few decode steps to settle
            engine.step()
        real = profiled(engine.step, args.steps)
        replay = profiled(last.graph.replay, args.steps)
    print(f"{args.shape}, batch {args.batch}, {args.adapters} adapters of rank {args.rank}")
    for name, r in (("engine steps", real), ("graph replays", replay)):
        print(f"{name}: kernel time {r['kernel_us_per_step']:.0f} us a step, span {r['span_us_per_step']:.0f} us")
    by_name = {r["kernel"]: r for r in replay["kernels"]}
    print(f"{'step us':>9} {'replay us':>10} {'n':>5}  kernel")
    for r in real["kernels"][:30]:
        other = by_name.get(r["kernel"], {}).get("us_per_step", 0.0)
        print(f"{r['us_per_step']:9.1f} {other:10.1f} {r['launches_per_step']:5.0f}  {r['kernel'][:100]}")
    write_json(args.out, {"benchmark": "profile_lora_step", **run_info(sys.argv), "settings": vars(args),
                          "engine_steps": real, "graph_replays": replay})
    return 0


if __name__ == "__main__":
    sys.exit(main())
