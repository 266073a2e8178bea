"""Batch-1 decode speed of Ember's engine against the memory roofline and Hugging Face `generate`.

For each model shape (random Llama-3.2-1B / Llama-3.1-8B shaped weights, built on the GPU) and each
weight format (bf16, int8, int4 g128), one request at a time: a random prompt of --prompt-len
tokens, --output-len tokens out, greedy, ignore_eos, through the full engine (scheduler, runner
with CUDA graphs, sampler, output processing). Reported per run:

    tokens_per_s      decode tokens/s (first token excluded: that step is the prefill)
    step_ms           1000 / tokens_per_s, the whole engine step
    gpu_step_ms       one replay of the batch-1 decode graph alone (CUDA events): the GPU's share
    roofline_ms       (weight bytes + KV bytes read per step at the mean context) / copy bandwidth
    pct_roofline      roofline_ms / step_ms   (and pct_roofline_gpu with gpu_step_ms)

The copy bandwidth is measured in the same run (device-to-device copy of a 2 GB tensor, CUDA events,
median of repeats, read + write bytes). Hugging Face transformers `generate` runs on the bf16
weights (LlamaForCausalLM, greedy, batch 1, same prompt length; --hf-tokens new tokens, its decode
rate taken as the difference between a 1-token and an N-token generate). Eager engine decode (no
CUDA graphs) is timed too for bf16.

    python benchmarks/bench_decode.py --out decode.json                   # the H200 run (~3 min)
    python benchmarks/bench_decode.py --shapes 1b --dtypes bf16 --no-hf --out d.json
    python benchmarks/bench_decode.py --smoke --out /tmp/d.json           # CPU plumbing check, seconds
"""
from __future__ import annotations

import argparse
import gc
import logging
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from random_models import NAMES, hf_twin, kv_bytes_per_token, random_model, weight_bytes  # noqa: E402
from run_info import copy_bandwidth, run_info, sync, write_json  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.quant import quantize_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

BITS = {"bf16": None, "int8": 8, "int4": 4}
REQUEST_IDS = itertools.count()


def build(shape: str, dtype: str, device: str, seed: int, head_bits: int | None = None) -> torch.nn.Module:
    """A random model; int8/int4 as `ember quantize` writes it (norm weights folded in first: random
    models' are 1 already), with lm_head left in bf16 or quantized to `head_bits` (0: the layers' width)."""
    model = random_model(shape, torch.bfloat16, device, seed)
    if BITS[dtype]:
        head_bits = BITS[dtype] if head_bits == 0 else head_bits
        group_size = 128 if model.config.hidden_size % 128 == 0 else 32
        overrides = {"lm_head": {"bits": head_bits, "group_size": group_size}} \
            if head_bits not in (None, BITS[dtype]) else None
        quantize_model(model, BITS[dtype], group_size, modules_to_not_convert=("lm_head",) if head_bits is None else (),
                       fold_norms=True, overrides=overrides)
        release()
    return model


def uses_pdl(device: str) -> bool:
    """Whether the decode kernels launch with programmatic dependent launch here (EMBER_PDL)."""
    if not device.startswith("cuda"):
        return False
    from engine.kernels._triton_util import pdl_launch

    return bool(pdl_launch(torch.device(device))["PDL"])


def make_engine(model, device: str, enforce_eager: bool = False) -> Engine:
    config = EngineConfig(device=device, max_model_len=4096, kv_cache_tokens=16384, max_num_seqs=8,
                          max_num_batched_tokens=1024, extra={"enforce_eager": enforce_eager})
    return Engine(config, model=model, tokenizer=None)


class StepTimer:
    """Wall time of each phase of Engine.step(), by wrapping the engine's collaborators on the instance."""

    # With overlapped decode, "_land" (waiting for a step's tokens, then "update" and "_make_outputs",
    # which are also listed on their own) runs while the next step is already on the GPU.
    PHASES = (("scheduler", "schedule"), ("runner", "prepare_inputs"), ("runner", "execute_model"),
              (None, "_sample"), (None, "_land"), ("scheduler", "update"), (None, "_make_outputs"))

    def __init__(self, engine: Engine):
        self.totals = {name: 0.0 for _, name in self.PHASES}
        for owner, name in self.PHASES:
            obj = engine if owner is None else getattr(engine, owner)
            setattr(obj, name, self._wrap(getattr(obj, name), name))

    def _wrap(self, fn, name):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start
        return timed

    def per_step_ms(self, steps: int) -> dict:
        return {k: round(v * 1e3 / steps, 4) for k, v in self.totals.items()}


def engine_decode(engine: Engine, prompt_len: int, output_len: int, repeats: int, rng: random.Random) -> dict:
    """Median over repeats of one request's decode rate and time to first token (fresh random prompts)."""
    runs = []
    device = str(engine.runner.device)
    for _ in range(repeats):
        prompt = [rng.randrange(3, engine.vocab_size) for _ in range(prompt_len)]
        engine.add_request(f"d{next(REQUEST_IDS)}", prompt, SamplingParams(max_tokens=output_len, temperature=0.0,
                                                                          ignore_eos=True))
        sync(device)
        start = time.perf_counter()
        first = None
        steps = 0
        while engine.has_unfinished():
            outs = engine.step()
            steps += 1
            if outs and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        runs.append({"tokens_per_s": (output_len - 1) / (end - first), "ttft_ms": (first - start) * 1e3,
                     "steps": steps})
    return {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "ttft_ms")} | {"runs": runs}


def graph_replay_ms(engine: Engine, iters: int = 200) -> float | None:
    """GPU time of one batch-1 decode step: the captured graph replayed on its last inputs (None without graphs)."""
    graphs = engine.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return None
    graph = graphs.graphs[1]
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(iters // 5):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / (iters // 5))
    return statistics.median(samples)


@torch.inference_mode()
def hf_decode(hf, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """HF generate at batch 1: decode tokens/s from the difference of a 1-token and an N-token call."""
    g = torch.Generator().manual_seed(seed)
    device = str(hf.device)
    ids = torch.randint(3, hf.config.vocab_size, (1, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def timed(n):
        sync(device)
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        sync(device)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    timed(4)  # warm-up
    one = timed(1)
    full = timed(new_tokens)
    rate = (new_tokens - 1) / (full - one) if full > one else new_tokens / full  # (noise on tiny smoke runs)
    return {"hf_tokens_per_s": rate, "hf_new_tokens": new_tokens, "hf_seconds": full}


def release() -> None:
    """Give freed GPU memory back (call after dropping the last reference to an engine or model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_shape(shape: str, args, bandwidth: float) -> list[dict]:
    rng = random.Random(args.seed)
    rows = []
    hf_result = {}
    for dtype in args.dtypes:
        model = build(shape, dtype, args.device, args.seed, args.lm_head_bits)
        config = model.config
        if dtype == "bf16" and args.hf_tokens.get(shape, 0) > 0:
            hf = hf_twin(model, shape)
            hf_result = hf_decode(hf, args.prompt_len, args.hf_tokens[shape], args.seed)
            del hf
            release()
            print(f"  {shape} HF generate: {hf_result['hf_tokens_per_s']:.1f} tokens/s", flush=True)
        wbytes = weight_bytes(model)
        t0 = time.perf_counter()
        engine = make_engine(model, args.device)
        init_s = time.perf_counter() - t0
        timer = StepTimer(engine)
        engine_decode(engine, args.prompt_len, 8, 1, rng)  # warm-up request
        timer.totals = dict.fromkeys(timer.totals, 0.0)
        result = engine_decode(engine, args.prompt_len, args.output_len, args.repeats, rng)
        steps = sum(r["steps"] for r in result["runs"])
        gpu_ms = graph_replay_ms(engine)
        mean_ctx = args.prompt_len + args.output_len / 2
        kv = kv_bytes_per_token(config, torch.bfloat16) * mean_ctx
        roofline_ms = (wbytes + kv) / (bandwidth * 1e12) * 1e3
        step_ms = 1e3 / result["tokens_per_s"]
        row = {
            "model": shape, "name": NAMES[shape], "dtype": dtype, "weight_gb": wbytes / 1e9, "kv_mb_per_step": kv / 1e6,
            "tokens_per_s": result["tokens_per_s"], "step_ms": step_ms, "ttft_ms": result["ttft_ms"],
            "gpu_step_ms": gpu_ms, "roofline_ms": roofline_ms, "pct_roofline": 100 * roofline_ms / step_ms,
            "pct_roofline_gpu": 100 * roofline_ms / gpu_ms if gpu_ms else None,
            "engine_init_s": init_s, "graph_capture_s": engine.runner.cuda_graph_capture_s,
            "graph_batch_sizes": engine.runner.graphs.sizes if engine.runner.graphs else [],
            "phase_ms_per_step": timer.per_step_ms(steps), "runs": result["runs"],
            "overlap_decode": engine.overlap, "overlapped_steps": engine.stats().overlapped_steps,
            "norms_folded": engine.runner.norms_folded,
            "pdl": uses_pdl(args.device),
        }
        del engine, timer
        release()
        if dtype == "bf16":
            row.update(hf_result)
            if not args.no_eager:
                eager = make_engine(model, args.device, enforce_eager=True)
                engine_decode(eager, args.prompt_len, 8, 1, rng)
                row["eager_tokens_per_s"] = engine_decode(eager, args.prompt_len, args.output_len, 1,
                                                          rng)["tokens_per_s"]
                del eager
                release()
        del model
        release()
        rows.append(row)
        gpu = f"{gpu_ms:.3f}" if gpu_ms else "-"
        print(f"  {shape} {dtype:<5} {row['tokens_per_s']:8.1f} tok/s  step {step_ms:.3f} ms (GPU {gpu} ms)  "
              f"roofline {roofline_ms:.3f} ms = {row['pct_roofline']:.0f}%  capture {row['graph_capture_s']:.1f} s",
              flush=True)
    return rows


def parse_hf_tokens(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--dtypes", default="bf16,int8,int4")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-tokens", type=parse_hf_tokens, default=parse_hf_tokens("1b=128,8b=64"),
                    help="new tokens for HF generate per shape, e.g. 1b=128,8b=64 (0 skips it)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--quantize-lm-head", action="store_true",
                    help="int8/int4 models: quantize lm_head too (as `ember quantize --quantize-lm-head`)")
    ap.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=None,
                    help="int8/int4 models: quantize lm_head to this width (as `ember quantize --lm-head-bits`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="plumbing check on the CPU: tiny shape, few tokens")
    ap.add_argument("--out", default="out/bench_decode.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.shapes, args.prompt_len, args.output_len, args.repeats = "cpu", "tiny", 16, 12, 2
        args.hf_tokens = {"tiny": 6}
    args.shapes, args.dtypes = args.shapes.split(","), args.dtypes.split(",")
    if args.quantize_lm_head and args.lm_head_bits is None:
        args.lm_head_bits = 0  # the layers' own width
    if args.no_hf:
        args.hf_tokens = {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (or --smoke)")
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("engine").setLevel(logging.INFO)  # KV sizing, warm-up and graph capture times
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth {bandwidth:.2f} TB/s", flush=True)
    report = {"benchmark": "decode", **run_info(sys.argv), "copy_bandwidth_tbs": bandwidth,
              "settings": {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
                           "hf_new_tokens": args.hf_tokens, "batch": 1, "greedy": True, "ignore_eos": True,
                           "int4_group_size": 128, "lm_head_bits": args.lm_head_bits},
              "results": []}
    for shape in args.shapes:
        report["results"] += bench_shape(shape, args, bandwidth)
        write_json(args.out, report)  # after each shape, so a cut-short run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
