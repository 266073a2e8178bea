"""Offline continuous-batching throughput on the GPU, next to Hugging Face `generate` at a static batch.

For each shape (random Llama-3.2-1B / Llama-3.1-8B shaped bf16 weights built on the GPU): N requests
(prompt lengths U[--prompt-len], output lengths U[--output-len], ignore_eos, greedy) are queued at
once and the engine steps until all are done (bench_throughput.run_once); the KV pool is sized
from free memory (--gpu-memory-utilization). Then transformers' LlamaForCausalLM with the same
weights runs `generate` on static batches of the same requests' prompts (left padded) for each of
--hf-batch-sizes, --hf-new-tokens new tokens per row; its best batch is the baseline.

The HF figure is favourable to HF: every row produces --hf-new-tokens useful tokens (the waste of
a static batch running to its longest request is not counted) and only one batch is timed.

    python benchmarks/bench_throughput_gpu.py --out throughput.json          # the H200 run (~3.5 min)
    python benchmarks/bench_throughput_gpu.py --shapes 1b --num-requests 200 --out t.json
    python benchmarks/bench_throughput_gpu.py --smoke --out /tmp/t.json     # CPU plumbing check, seconds
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_throughput import make_requests, parse_range, run_once  # noqa: E402
from random_models import NAMES, hf_twin, random_model, shape_config  # noqa: E402
from run_info import run_info, sync, write_json  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_graph_steps(engine: Engine) -> dict:
    """Counts decode steps replayed from CUDA graphs (the rest ran eagerly)."""
    counts = {"graph_steps": 0}
    graphs = engine.runner.graphs
    if graphs is not None:
        replay = graphs.replay

        def counting(inp):
            counts["graph_steps"] += 1
            return replay(inp)

        graphs.replay = counting
    return counts


def ember_throughput(shape: str, requests, args) -> dict:
    model = random_model(shape, torch.bfloat16, args.device, args.seed)
    config = EngineConfig(device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed)
    t0 = time.perf_counter()
    engine = Engine(config, model=model, tokenizer=None)
    init_s = time.perf_counter() - t0
    vocab = engine.model_config.vocab_size
    run_once(engine, make_requests(64, args.prompt_len, (8, 24), vocab, args.seed + 999), 0.0, "warmup")
    counts = count_graph_steps(engine)
    result = run_once(engine, requests, 0.0, "run")
    stats = engine.stats()
    result.update(counts, engine_init_s=init_s, graph_capture_s=engine.runner.cuda_graph_capture_s,
                  kv_blocks=stats.kv_blocks_total, kv_tokens=stats.kv_blocks_total * config.block_size)
    del engine, model
    release()
    return result


def hf_generate_seconds(hf, prompts, new_tokens: int) -> float:
    """Wall time of one HF generate call on a left-padded static batch."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = str(hf.device)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, do_sample=False)
    sync(device)
    assert out.shape[1] == width + new_tokens
    return time.perf_counter() - t


@torch.inference_mode()
def hf_static(shape: str, requests, args) -> list[dict]:
    """HF generate on the first B prompts, left padded, --hf-new-tokens each, for each batch size B."""
    hf = hf_twin(random_model(shape, torch.bfloat16, args.device, args.seed), shape)
    release()
    hf_generate_seconds(hf, [p for p, _ in requests[:4]], 4)  # warm-up
    rows = []
    for b in args.hf_batch_sizes:
        try:
            prompts = [p for p, _ in requests[:b]]
            hf_generate_seconds(hf, prompts, 2)  # this batch shape's first call (allocator, kernel choices)
            seconds = hf_generate_seconds(hf, prompts, args.hf_new_tokens)
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            release()
            continue
        rows.append({"batch": b, "new_tokens": args.hf_new_tokens, "seconds": seconds,
                     "output_tokens_per_s": b * args.hf_new_tokens / seconds})
        print(f"  {shape} HF generate batch {b}: {rows[-1]['output_tokens_per_s']:.0f} output tokens/s", flush=True)
    del hf
    release()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--prompt-len", type=parse_range, default=(64, 1024), help="LO:HI tokens")
    ap.add_argument("--output-len", type=parse_range, default=(64, 512), help="LO:HI tokens")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--hf-batch-sizes", default="32,64")
    ap.add_argument("--hf-new-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="plumbing check on the CPU: tiny shape, few requests")
    ap.add_argument("--out", default="out/bench_throughput_gpu.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.shapes, args.num_requests = "cpu", "tiny", 12
        args.prompt_len, args.output_len, args.hf_batch_sizes, args.hf_new_tokens = (8, 64), (4, 16), "2,4", 8
        args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len = 8, 128, 256
    args.hf_batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_throughput_gpu needs a CUDA GPU (or --smoke)")
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("engine").setLevel(logging.INFO)  # KV sizing, warm-up and graph capture times
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"benchmark": "throughput", **run_info(sys.argv), "settings": settings,
              "hf_note": "HF: one static batch of the first B prompts (left padded), hf_new_tokens useful tokens "
                         "per row; favours HF (no waste from unequal output lengths)",
              "results": []}
    results = report["results"]
    for shape in args.shapes.split(","):
        vocab = shape_config(shape).vocab_size
        requests = make_requests(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed)
        ember = ember_throughput(shape, requests, args)
        print(f"  {shape} Ember: {ember['output_tokens_per_s']:.0f} output tokens/s, "
              f"{ember['seconds']:.1f} s for {len(requests)} requests, {ember['steps']} steps "
              f"({ember['graph_steps']} from CUDA graphs), {ember['preemptions']} preemptions", flush=True)
        hf = [] if args.no_hf else hf_static(shape, requests, args)
        best = max((r for r in hf if "output_tokens_per_s" in r), key=lambda r: r["output_tokens_per_s"], default=None)
        results.append({"model": shape, "name": NAMES[shape], "dtype": "bf16", "ember": ember, "hf": hf,
                        "hf_best": best, "speedup_vs_hf_best": ember["output_tokens_per_s"] / best["output_tokens_per_s"]
                        if best else None})
        write_json(args.out, report)  # after each shape, so a cut-short run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
