"""`ember generate --prompts-file FILE.jsonl`: every prompt through the batching engine at once.

Each input line is {"prompt": "text"} or {"prompt_ids": [...]}, plus any SamplingParams field
(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, ...); the command-line sampling
flags are the defaults. One JSON line is printed per prompt, in input order:
{"prompt_ids": [...], "output_ids": [...], "text": "...", "finish_reason": "..."}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

PROMPT_KEYS = ("prompt", "prompt_ids")


def read_prompts(path: str, defaults: dict[str, Any]) -> list[tuple[int, Any, dict[str, Any]]]:
    """(line number, prompt text or ids, sampling fields) for each non-blank line; clear errors otherwise."""
    from engine.sampling import SamplingParams

    known = {f.name for f in dataclasses.fields(SamplingParams)}
    items = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or sum(k in obj for k in PROMPT_KEYS) != 1:
            raise ValueError(f'{where}: each line must be an object with exactly one of "prompt" or "prompt_ids"')
        unknown = sorted(set(obj) - known - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        prompt = obj.get("prompt", obj.get("prompt_ids"))
        if "prompt_ids" in obj and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise ValueError(f"{where}: prompt_ids must be a list of integers")
        if "prompt" in obj and not isinstance(prompt, str):
            raise ValueError(f"{where}: prompt must be a string")
        fields = {**defaults, **{k: v for k, v in obj.items() if k not in PROMPT_KEYS}}
        items.append((lineno, prompt, fields))
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def run_prompts_file(args: argparse.Namespace) -> int:
    from engine.errors import InvalidRequestError
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "ignore_eos": args.ignore_eos}
    items = read_prompts(args.prompts_file, defaults)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_tokens=args.kv_cache_tokens,
              max_num_seqs=args.max_num_seqs)
    prompts, params = [], []
    for lineno, prompt, fields in items:
        try:
            p = SamplingParams(**fields)
            ids = llm.encode(prompt)
            llm.engine.validate(ids, p)
        except InvalidRequestError as exc:
            raise ValueError(f"{args.prompts_file}:{lineno}: {exc.message}") from None
        except TypeError as exc:
            raise ValueError(f"{args.prompts_file}:{lineno}: {exc}") from None
        prompts.append(ids)
        params.append(p)
    for result in llm.generate(prompts, params):
        first = result.outputs[0]
        line = {"prompt_ids": result.prompt_token_ids, "output_ids": first.token_ids, "text": first.text,
                "finish_reason": first.finish_reason}
        if len(result.outputs) > 1:
            line["choices"] = [{"output_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
                               for o in result.outputs]
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0
