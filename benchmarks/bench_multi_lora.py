"""Multi-adapter serving throughput: a batch of requests spread over 1, 8 or 32 distinct adapters,
against the base model alone, measured in the same run.

    python benchmarks/bench_multi_lora.py --device cuda --shape llama-1b     # the H200 figures
    python benchmarks/bench_multi_lora.py --device cuda --shape llama-8b --adapter-counts 1,8
    python benchmarks/bench_multi_lora.py                                     # a tiny smoke run on the CPU

Random-weight model and random rank-16 adapters (written to a temporary LoRA root and loaded through
the registry, as the server does). Every configuration queues the same `--batch` requests
(prompt `--prompt-len`, output `--output-len`, ignore_eos) at once and steps the engine to the end.
Reported per configuration, median over `--repeats`: output tokens/s for the whole run; decode-phase
tokens/s, by wall clock from the step that gave the last request its first token to the end (the
engine as it serves: with overlapped decode on CUDA) and the mean step time there
(`decode_step_ms_mean`); the host time of each phase of Engine.step() averaged over all steps
(`phase_ms_per_step`, bench_decode's StepTimer); and on CUDA the GPU time of the largest decode
batch's graph alone (`gpu_step_ms`: replayed on the inputs of the last step that ran it, CUDA events).
With --step-breakdown every step is also split into host preparation, launch and the wait for the
GPU (`decode_{prepare,launch,wait}_ms_median`, `decode_step_ms_median`); that timer waits for each
step's GPU work, so steps then run synchronously.

With --shrink-ab the largest count runs once more on an engine whose decode steps compute x A^T with
the separate shrink kernel (on a side stream beside the base projection) instead of inside the base
projection's GEMM (EMBER_LORA_STACKED=0; engine/lora_serving.py), an A/B of the two.

Two baselines: "base, LoRA off" is an engine without adapter support (its fastest path), and
"base, LoRA on" is the adapter-enabled engine serving requests without an adapter (what enabling
adapters costs before any is used). "LoRA off" runs twice, as the first and the last engine of
the process, and ratios are against the faster of the two (the order of engines has moved host
time per step by a quarter of a millisecond on the H200).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_decode import StepTimer as PhaseTimer  # noqa: E402
from bench_throughput import SHAPES, hardware  # noqa: E402
from random_models import random_model  # noqa: E402
from engine.adapter_testing import write_random_adapter  # noqa: E402
from engine.adapters import AdapterServingConfig  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.model import Transformer  # noqa: E402
from run_info import git_commit, write_json  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

SHAPES = {**SHAPES, "llama-8b": None,  # built by random_models
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)}


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int) -> Transformer:
    if shape == "llama-8b":  # built in place on the device (the default init would take 32 GB of fp32)
        return random_model("8b", dtype, device, seed).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(ModelConfig(**SHAPES[shape]))  # torch's default init: fine for timing
    return model.to(dtype).eval()


class StepTimer:
    """Wraps the runner's execute to time every step (waiting for its GPU work) and note whether it was a
    pure decode step; decode steps also keep their split into input preparation, launch (the forward's
    host call, a graph replay on CUDA) and the wait for the GPU after it."""

    def __init__(self, engine: Engine):
        self.records: list[tuple[float, int, bool]] = []  # (seconds, sequences, decode-only)
        self.decode_parts: list[tuple[float, float, float]] = []  # (prepare, launch, wait) seconds
        self.runner = engine.runner
        engine.runner.execute = self

    def __call__(self, plan, input_ids=None):  # input_ids: a step planned ahead (overlapped decode)
        start = time.perf_counter()
        inp = self.runner.prepare_inputs(plan, input_ids)
        prepared = time.perf_counter()
        out = self.runner.execute_model(inp)
        launched = time.perf_counter()
        out.logits.sum().item()  # wait for the step's GPU work
        end = time.perf_counter()
        decode = all(len(s.token_ids) == 1 for s in plan.seqs)
        self.records.append((end - start, len(plan.seqs), decode))
        if decode:
            self.decode_parts.append((prepared - start, launched - prepared, end - launched))
        return out


class LastGraph:
    """Remembers the captured graph of the largest decode batch (the latest of those) and that step's
    inputs, to time its replay alone afterwards. Not simply the last step's: requests admitted in later
    prefill steps finish later, so a run's last decode steps are smaller batches, and the static input
    buffers then hold a smaller step (its rows past the batch are padding), so the remembered step is
    packed into them again before timing."""

    def __init__(self, engine: Engine):
        self.graphs = engine.runner.graphs
        self.graph = None
        self.batch = 0
        self.inputs = None  # (plan, device input ids or None) of the remembered step
        self._preparing = None
        if self.graphs is not None:
            prepare, replay = self.graphs.prepare, self.graphs.replay

            def preparing(plan, input_ids=None):
                self._preparing = (plan, input_ids)
                return prepare(plan, input_ids)

            def remembering(inp):
                if inp.graph_batch >= self.batch:
                    self.graph, self.batch = self.graphs.graph_for(inp), inp.graph_batch
                    self.inputs = self._preparing
                return replay(inp)

            self.graphs.prepare, self.graphs.replay = preparing, remembering

    def replay_ms(self, iters: int = 100) -> float | None:
        """Median GPU milliseconds of one replay (CUDA events over batches of replays); None without graphs.
        The step's KV slots are written again: their requests have ended, nothing reads them."""
        if self.graph is None:
            return None
        self.graphs.prepare(*self.inputs)
        for _ in range(5):
            self.graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(5):
            start.record()
            for _ in range(iters // 5):
                self.graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / (iters // 5))
        return statistics.median(samples)


def run(engine: Engine, timer: "StepTimer | None", adapters: list[str | None], args, tag: str) -> dict:
    """One batch to the end. The decode phase runs from the step that gave the last request its first
    token to the end; its rate is tokens over wall time, so it holds with overlapped decode too."""
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(args.batch)]
    for i, rid in enumerate(ids):
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
        engine.add_request(rid, prompt, params, lora=adapters[i % len(adapters)])
    if timer is not None:
        timer.records.clear()
        timer.decode_parts.clear()
    before = engine.stats().generation_tokens_total
    waiting_first = set(ids)
    decode_start = decode_tokens0 = None
    decode_steps = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        if decode_start is not None:
            decode_steps += 1
            continue
        waiting_first.difference_update(o.request_id for o in outs if any(c.token_ids for c in o.outputs))
        if not waiting_first:
            decode_start, decode_tokens0 = time.perf_counter(), engine.stats().generation_tokens_total
    end = time.perf_counter()
    total = engine.stats().generation_tokens_total
    decode_s = end - decode_start if decode_start is not None else 0.0
    out = {"seconds": end - start, "output_tokens_per_s": (total - before) / (end - start),
           "decode_tokens_per_s": (total - decode_tokens0) / decode_s if decode_s else 0.0,
           "decode_step_ms_mean": 1e3 * decode_s / decode_steps if decode_steps else 0.0}
    if timer is not None:
        decode = [s for s, _, d in timer.records if d]
        out["decode_step_ms_median"] = 1e3 * statistics.median(decode) if decode else 0.0
        out.update({f"decode_{part}_ms_median": 1e3 * statistics.median(p[i] for p in timer.decode_parts)
                    for i, part in enumerate(("prepare", "launch", "wait")) if timer.decode_parts})
        out["steps"] = len(timer.records)
    return out


class Probes:
    """The timers of one engine, installed once (wrapping again per configuration would nest them).
    The per-step split (StepTimer) waits for each step's GPU work, which makes every step synchronous:
    only with --step-breakdown."""

    def __init__(self, engine: Engine, breakdown: bool = False):
        self.steps = StepTimer(engine) if breakdown else None
        self.phases, self.last = PhaseTimer(engine), LastGraph(engine)


def measure(engine: Engine, probes: Probes, adapters: list[str | None], args, name: str) -> dict:
    timer, phases, last = probes.steps, probes.phases, probes.last
    run(engine, timer, adapters, args, f"{name}-warmup")
    phases.totals = dict.fromkeys(phases.totals, 0.0)
    last.graph, last.batch = None, 0
    steps_before = engine.stats().num_steps
    runs = [run(engine, timer, adapters, args, f"{name}-{r}") for r in range(args.repeats)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"name": name, "distinct_adapters": len([a for a in adapters if a]), "median": median, "runs": runs,
            "phase_ms_per_step": phases.per_step_ms(max(1, engine.stats().num_steps - steps_before)),
            "gpu_step_ms": last.replay_ms(), "overlap_decode": engine.overlap,
            "overlapped_steps": engine.stats().overlapped_steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapter-counts", default="1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default="out/bench_multi_lora.json")
    ap.add_argument("--step-breakdown", action="store_true",
                    help="time each step's preparation, launch and GPU wait (makes every step synchronous)")
    ap.add_argument("--shrink-ab", action="store_true",
                    help="also run the largest adapter count with the separate shrink kernel (EMBER_LORA_STACKED=0)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    counts = [int(c) for c in args.adapter_counts.split(",")]
    kv_tokens = 16 * -(-(args.batch * (args.prompt_len + args.output_len + 16)) // 16)
    engine_config = dict(model="", device=args.device, max_num_seqs=args.batch, kv_cache_tokens=kv_tokens,
                         max_num_batched_tokens=max(2048, args.prompt_len), max_model_len=args.prompt_len +
                         args.output_len + 16, seed=args.seed, enable_prefix_caching=False)
    results = []

    engine = Engine(EngineConfig(**engine_config), model=build_model(args.shape, args.device, dtype, args.seed),
                    tokenizer=None)
    results.append(measure(engine, Probes(engine, args.step_breakdown), [None], args, "base, LoRA off"))
    capture_s = {"LoRA off": engine.runner.cuda_graph_capture_s}
    del engine
    gc.collect()
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None

    with tempfile.TemporaryDirectory() as root:
        model = build_model(args.shape, args.device, dtype, args.seed)
        names = [f"adapter-{i}" for i in range(max(counts))]
        load_start = time.perf_counter()
        for i, name in enumerate(names):
            write_random_adapter(model, Path(root) / name, r=args.rank, alpha=2 * args.rank, seed=i,
                                 strength=0.05)
        write_s = time.perf_counter() - load_start
        adapters = AdapterServingConfig(lora_root=root, max_loras=max(counts), max_lora_rank=args.rank)
        engine = Engine(EngineConfig(**engine_config), model=model, tokenizer=None, adapters=adapters)
        load_start = time.perf_counter()
        for name in names:
            engine.adapters.load(name, name)
        load_s = (time.perf_counter() - load_start) / len(names)
        capture_s["LoRA on"] = engine.runner.cuda_graph_capture_s
        graphs = engine.runner.graphs
        adapter_graphs = len(graphs.adapter_graphs) if graphs is not None else 0
        probes = Probes(engine, args.step_breakdown)
        results.append(measure(engine, probes, [None], args, "base, LoRA on"))
        for n in counts:
            results.append(measure(engine, probes, names[:n], args, f"{n} adapters"))
        evictions = engine.adapters.evictions
        del engine
        if args.shrink_ab:  # the same adapters with the separate shrink kernel, not the stacked GEMM
            del model  # wrapped by the engine above: a fresh copy of the same weights
            gc.collect()
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None
            model = build_model(args.shape, args.device, dtype, args.seed)
            os.environ["EMBER_LORA_STACKED"] = "0"
            try:
                engine = Engine(EngineConfig(**engine_config), model=model, tokenizer=None, adapters=adapters)
            finally:
                del os.environ["EMBER_LORA_STACKED"]
            for name in names[:max(counts)]:
                engine.adapters.load(name, name)
            results.append(measure(engine, Probes(engine, args.step_breakdown), names[:max(counts)], args,
                                   f"{max(counts)} adapters, shrink kernel"))
            del engine
    del model
    gc.collect()
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None

    # The base alone once more, last: engines measured earlier and later in a process have shown
    # different host times, so the baseline is the faster of the two runs (order cannot flatter).
    engine = Engine(EngineConfig(**engine_config), model=build_model(args.shape, args.device, dtype, args.seed),
                    tokenizer=None)
    results.append(measure(engine, Probes(engine, args.step_breakdown), [None], args, "base, LoRA off (last)"))
    del engine

    bases = [r for r in results if r["name"].startswith("base, LoRA off")]
    ref = max(bases, key=lambda r: r["median"]["decode_tokens_per_s"])["median"]
    print(f"{'configuration':<18}{'out tok/s':>12}{'decode tok/s':>14}{'decode step ms':>16}{'GPU ms':>8}"
          f"{'vs base':>9}  host ms per step (all steps)")
    for r in results:
        m = r["median"]
        r["ratio_vs_base"] = m["output_tokens_per_s"] / ref["output_tokens_per_s"]
        r["decode_ratio_vs_base"] = m["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        gpu = f"{r['gpu_step_ms']:.3f}" if r["gpu_step_ms"] is not None else "-"
        phases = " ".join(f"{k.strip('_')} {v:.3f}" for k, v in r["phase_ms_per_step"].items())
        step_ms = m.get("decode_step_ms_median", m["decode_step_ms_mean"])
        print(f"{r['name']:<18}{m['output_tokens_per_s']:>12.1f}{m['decode_tokens_per_s']:>14.1f}"
              f"{step_ms:>16.2f}{gpu:>8}{r['decode_ratio_vs_base']:>9.3f}  {phases}")
    print(f"adapter load {1e3 * load_s:.1f} ms each (files written in {write_s:.1f} s); slot evictions {evictions}")
    print(f"CUDA-graph capture: {capture_s['LoRA off']:.1f} s without adapters, {capture_s['LoRA on']:.1f} s with "
          f"({adapter_graphs} adapter graphs)")

    report = {"benchmark": "multi_lora", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": git_commit(), "hardware": hardware(),
        "settings": {**vars(args), "dtype": str(dtype), "kv_cache_tokens": kv_tokens},
        "adapter_load_seconds_each": load_s, "graph_capture_seconds": capture_s, "adapter_graphs": adapter_graphs,
        "results": results}
    if args.json_out:
        write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
