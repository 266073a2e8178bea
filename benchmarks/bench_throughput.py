"""Offline throughput of the engine: N requests at once, random prompt/output lengths, ignore_eos.

    python benchmarks/bench_throughput.py                      # a tiny random model on the CPU
    python benchmarks/bench_throughput.py --device cuda --shape llama-1b   # random Llama-3.2-1B shape, bf16
    python benchmarks/bench_throughput.py --model DIR --device cuda --num-requests 256 \
        --prompt-len 64:1024 --output-len 256:256 --json-out out/throughput.json

Each repeat draws fresh random prompts (so the prefix cache cannot help across repeats), queues them
all, and steps the engine until every request is done. Prints the median over repeats of output
tokens/s, total tokens/s and requests/s, and writes them with the settings, hardware and commit as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from run_info import git_commit, write_json  # noqa: E402


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 0 < lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 0 < LO <= HI, got {text!r}")
    return lo_i, hi_i


def make_requests(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


# Random-weight shapes built in memory (no checkpoint, no tokenizer: token ids only).
SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                     rope_theta=500000.0, tie_word_embeddings=True),
}


def random_model(shape: str, device: str, dtype: str | None):
    from engine.checkpoint import parse_dtype
    from engine.config import ModelConfig
    from engine.model import Transformer

    with torch.device(device):
        model = Transformer(ModelConfig(**SHAPES[shape]))  # torch's default init: fine for timing
    return model.to(parse_dtype(dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)).eval()


def run_once(engine: Engine, requests, temperature: float, tag: str) -> dict:
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                ignore_eos=True))
    before = engine.stats()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    after = engine.stats()
    out_tokens = after.generation_tokens_total - before.generation_tokens_total
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "seconds": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "steps": after.num_steps - before.num_steps,
        "preemptions": after.num_preemptions - before.num_preemptions,
    }


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random model built in a temp dir)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="instead of --model: a random model of this shape")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=parse_range, default=(16, 128), help="LO:HI tokens")
    ap.add_argument("--output-len", type=parse_range, default=(16, 64), help="LO:HI tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default="out/bench_throughput.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None and args.shape is None:
            from training.tiny import make_tiny_checkpoint

            model_dir = str(make_tiny_checkpoint(Path(tmp) / "tiny", seed=args.seed))
        config = EngineConfig(model=model_dir or "", device=args.device, dtype=args.dtype,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              kv_cache_tokens=args.kv_cache_tokens,
                              enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)
        if args.shape:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            engine = Engine(config, model=random_model(args.shape, device, args.dtype), tokenizer=None)
        else:
            engine = Engine(config)
        vocab = engine.model_config.vocab_size
        run_once(engine, make_requests(4, (8, 16), (4, 8), vocab, args.seed + 999), args.temperature, "warmup")
        runs = [run_once(engine, make_requests(args.num_requests, args.prompt_len, args.output_len, vocab,
                                               args.seed + r), args.temperature, f"run{r}")
                for r in range(args.repeats)]

    keys = ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "seconds")
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"{'metric':<22}{'median':>12}{'min':>12}{'max':>12}")
    for k in keys:
        vals = [r[k] for r in runs]
        print(f"{k:<22}{median[k]:>12.2f}{min(vals):>12.2f}{max(vals):>12.2f}")
    print(f"steps/run {[r['steps'] for r in runs]}, preemptions/run {[r['preemptions'] for r in runs]}, "
          f"KV blocks {engine.stats().kv_blocks_total} x {config.block_size}")

    report = {
        "benchmark": "throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hardware": hardware(),
        "settings": {**vars(args), "model": args.model or args.shape or "tiny-random", "device": str(engine.runner.device),
                     "dtype": str(engine.runner.dtype), "kv_blocks": engine.stats().kv_blocks_total},
        "median": median,
        "runs": runs,
    }
    if args.json_out:
        write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
