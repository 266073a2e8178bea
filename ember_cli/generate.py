"""`ember generate` (text from a checkpoint) and `ember new-tiny` (a seeded tiny random checkpoint)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (reference path for one prompt)")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompts-file", help="JSONL, one {\"prompt\"|\"prompt_ids\", sampling fields...} a line: "
                     "all run through the batching engine, one JSON line out per prompt in input order")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (--prompts-file)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step (--prompts-file)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS up to --max-tokens")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run_generate)

    t = sub.add_parser("new-tiny", help="write a small random-weight checkpoint with a tokenizer")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_new_tiny)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def run_generate(args: argparse.Namespace) -> int:
    from engine.checkpoint import load_model
    from engine.generate import generate_reference
    from engine.detokenizer import IncrementalDetokenizer
    from engine.tokenizer import Tokenizer

    if args.prompts_file:
        from ember_cli.generate_batch import run_prompts_file

        return run_prompts_file(args)
    if args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise ValueError("--top-p must be in (0, 1]")
    model, config = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = Tokenizer.from_dir(args.model)
    prompt_ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else tok.encode(args.prompt)
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    if len(prompt_ids) >= config.max_position_embeddings:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {config.max_position_embeddings}")
    eos = sorted(set(config.eos_token_ids) | set(tok.eos_ids))
    out = generate_reference(model, prompt_ids, args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, eos_ids=eos, ignore_eos=args.ignore_eos)
    # Decode after the prompt's tokens so a word-initial piece keeps its leading space.
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    text = detok.add_many(out) + detok.finish()
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": out, "text": text}, ensure_ascii=False))
    else:
        sys.stdout.write((args.prompt or "") + text + "\n")
    return 0


def run_new_tiny(args: argparse.Namespace) -> int:
    from training.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny random {args.arch} checkpoint to {out}")
    return 0
