"""Host time of an engine step with the model out of the way: what the GPU waits for between steps.

The model forward and the sampler's tensor work are replaced by stubs (fixed logits, fixed token
ids), so only the engine's Python runs: scheduling, input preparation (the eager path; CUDA
graphs pack their inputs more cheaply), the sampler's bookkeeping, the scheduler update and the
output processing. `--batch` requests with `--prompt-len` prompts decode `--output-len` tokens;
the prefill steps run first, untimed; decode steps are reported per phase in ms a step
(bench_decode's StepTimer). Runs anywhere; the figure scales with the CPU's single-thread speed.

    python benchmarks/bench_host.py --batch 64 --out host.json
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode import StepTimer  # noqa: E402
from run_info import run_info, write_json  # noqa: E402

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.runner import ModelOutput  # noqa: E402
from engine.sampler import SamplerOutput  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def stubbed_engine(batch: int, max_len: int, vocab: int) -> Engine:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len)
    engine = Engine(EngineConfig(device="cpu", max_num_seqs=batch, max_num_batched_tokens=8192,
                                 kv_cache_tokens=batch * (max_len + 16), max_model_len=max_len),
                    model=Transformer(cfg).eval(), tokenizer=None)
    logits = torch.zeros(batch, vocab)
    tokens = torch.randint(3, vocab, (batch,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.runner.execute_model = lambda inp: ModelOutput(logits=logits[:inp.logits_indices.shape[0]],
                                                          sample_rows=inp.sample_rows, prompt_rows=inp.prompt_rows)
    engine.sampler = lambda lg, rows: SamplerOutput(token_ids=tokens[:len(rows)], logprobs=[None] * len(rows))
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default="out/bench_host.json")
    args = ap.parse_args(argv)
    engine = stubbed_engine(args.batch, args.prompt_len + args.output_len + 16, args.vocab)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"h{i}", [rng.randrange(3, args.vocab) for _ in range(args.prompt_len)], params)
    # Prefill first (long prompts take several chunked steps), so that only decode steps are timed.
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    timer = StepTimer(engine)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    step_ms = (time.perf_counter() - start) * 1e3 / steps
    phases = timer.per_step_ms(steps)
    print(f"batch {args.batch}: {step_ms:.3f} ms of host time a decode step; phases (ms): {phases}")
    write_json(args.out, {"benchmark": "host_step", **run_info(sys.argv), "settings": vars(args),
                          "host_ms_per_step": step_ms, "phase_ms_per_step": phases, "steps": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
