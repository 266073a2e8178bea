"""`ember eval`: benchmarks, perplexity and generation metrics, in process or against a server."""
from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (or a served model): perplexity, ARC, MMLU, PIQA, ...",
                       description="Score a checkpoint in process (--model) or a model behind an OpenAI-compatible "
                                   "server (--server, needs echo + logprobs on /v1/completions).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    src.add_argument("--server", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--adapter", help="adapter directory (PEFT layout), applied to --model")
    p.add_argument("--served-model", help="model name the server serves (with --server)")
    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"), help="bearer key (default: $EMBER_API_KEY)")
    p.add_argument("--tokenizer", help="with --server: tokenizer directory to use instead of the server's /tokenize")
    p.add_argument("--task", help="task name, or several separated by commas")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and exit")
    p.add_argument("--data", help="data file or folder (default: the task's file under $EMBER_DATA_DIR)")
    p.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each question")
    p.add_argument("--fewshot-data", help="file to draw few-shot examples from (default: the task's own choice)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items (perplexity: N windows)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot example draw")
    p.add_argument("--max-tokens", type=int, help="generation tasks: tokens to generate (default: the task's)")
    p.add_argument("--seq-len", type=int, help="perplexity: tokens per window (default: the context, at most 2048)")
    p.add_argument("--stride", type=int, help="perplexity: new tokens per window (default: seq-len / 2)")
    p.add_argument("--text-range", nargs=2, type=float, default=[0.0, 1.0], metavar=("START", "END"),
                   help="perplexity: the slice of the text to score, as fractions of its characters (0.9 1)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (prompts per HTTP request)")
    p.add_argument("--device", default="auto", help="with --model: cpu, cuda or auto")
    p.add_argument("--dtype", help="with --model: float32, bfloat16 or float16 (default: fp32 on CPU, else the "
                                   "checkpoint's)")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--samples", help="write one JSON line per evaluated item here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)


def _check(args: argparse.Namespace) -> list[str]:
    if args.model is None and args.server is None:
        raise ValueError("give --model DIR or --server URL")
    if args.server is not None and not args.served_model:
        raise ValueError("--server needs --served-model NAME (the model name the server serves)")
    if args.adapter and args.server:
        raise ValueError("--adapter applies to --model; a server serves its adapters under their own names")
    if not args.task:
        raise ValueError("give --task NAME (see --list-tasks)")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if args.data and len(tasks) > 1:
        raise ValueError("--data goes with a single --task")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    return tasks


def _backend(args: argparse.Namespace):
    if args.server is not None:
        from training.eval.remote import ServerModel

        tokenizer = None
        if args.tokenizer:
            from engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(args.tokenizer)
        return ServerModel(args.server, args.served_model, api_key=args.api_key, tokenizer=tokenizer,
                           batch_size=args.batch_size)
    from training.eval.local import LocalModel

    return LocalModel.load(args.model, args.adapter, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def run_eval(args: argparse.Namespace) -> int:
    from training.eval import EvalOptions, evaluate, format_table, get_task, task_names, write_json, write_samples

    if args.list_tasks:
        for name in task_names():
            spec = get_task(name)
            print(f"{name:16s} {spec.kind:16s} {spec.summary}")
        return 0
    tasks = _check(args)
    specs = [get_task(t) for t in tasks]  # unknown names fail before any model loads
    options = EvalOptions(data=args.data, num_fewshot=args.num_fewshot, fewshot_data=args.fewshot_data,
                          limit=args.limit, seed=args.seed, max_tokens=args.max_tokens, seq_len=args.seq_len,
                          stride=args.stride, text_range=tuple(args.text_range), progress=not args.no_progress)
    lm = _backend(args)
    reports = [evaluate(spec, lm, options) for spec in specs]
    print(format_table(reports))
    if args.json_out:
        write_json(reports, args.json_out)
        print(f"results written to {args.json_out}", file=sys.stderr)
    if args.samples:
        write_samples(reports, args.samples)
    return 0
