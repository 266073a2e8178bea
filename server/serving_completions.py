"""`POST /v1/completions`: prompts in, choices out, as one JSON body or as SSE chunks.

Choice indices run over prompts then choices: prompt `i`, choice `j` is index `i * n + j`.
With `echo` the prompt text (and, with `logprobs`, its log-probabilities) leads each choice.
"""
from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from server.errors import bad_request
from server.job import Job, new_id, new_record
from server.logprobs import LegacyLogprobs, prompt_offsets
from server.params import (check_prompt_length, check_text_size, check_token_ids, resolve_max_tokens,
                           sampling_params)
from server.protocol.completions import CompletionChoice, CompletionRequest, CompletionResponse
from server.state import ServerState
from server.unsupported import check_completion


@dataclass
class CompletionSpec:
    """How to present a completion job's outputs."""

    echo_texts: list[str] | None
    logprobs: int | None
    include_usage: bool
    continuous_usage: bool


def _tokenize_prompts(state: ServerState, prompt: Any) -> tuple[list[list[int]], list[str] | None]:
    """Token ids of every prompt, and their texts when the prompts came as text."""
    tok = state.tokenizer
    if isinstance(prompt, str):
        return [tok.encode(prompt)], [prompt]
    if prompt and isinstance(prompt[0], str):
        return [tok.encode(p) for p in prompt], list(prompt)
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)], None
    return [list(p) for p in prompt], None


def prepare_completion(state: ServerState, req: CompletionRequest, request: Request) -> tuple[Job, CompletionSpec]:
    """Validate and tokenize; every problem is a 400 that names the parameter."""
    target = state.models.resolve(req.model)
    check_completion(req)
    engine = state.require_engine()
    limits = state.limits
    count = 1 if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else len(req.prompt)
    if count > limits.max_prompts:
        raise bad_request(f"at most {limits.max_prompts} prompts per request", "prompt")
    if isinstance(req.prompt, str):
        check_text_size(len(req.prompt), limits, "prompt")
    elif isinstance(req.prompt[0], str):
        for text in req.prompt:
            check_text_size(len(text), limits, "prompt")
    prompts, texts = _tokenize_prompts(state, req.prompt)
    for ids in prompts:
        check_token_ids(ids, limits, "prompt")
        check_prompt_length(len(ids), limits, "prompt")
    explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
    max_tokens = resolve_max_tokens(req.max_tokens, explicit, 16, max(len(p) for p in prompts), limits,
                                    "max_tokens", allow_zero=req.echo)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = sampling_params(req, limits, max_tokens, req.logprobs, prompt_logprobs)
    if req.echo and texts is None:
        texts = [engine.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) for ids in prompts]
    request_id = new_id("cmpl")
    job = Job(state, target, request_id, prompts, params, new_record(state, request, target, request_id, req.user),
              priority=req.priority)
    opts = req.stream_options
    spec = CompletionSpec(echo_texts=texts if req.echo else None, logprobs=req.logprobs,
                          include_usage=bool(opts and opts.include_usage),
                          continuous_usage=bool(opts and opts.continuous_usage_stats))
    return job, spec


def _prompt_logprobs(job: Job, i: int, entries: list | None, builder: LegacyLogprobs) -> Any:
    ids, tok = job.prompts[i], job.state.tokenizer
    return builder.build(entries or [None] * len(ids), ids, tok, offsets=prompt_offsets(tok, ids))


async def complete(job: Job, spec: CompletionSpec) -> dict:
    """Run the job to the end and build the response body."""
    results = await job.collect()
    n = job.params.n
    choices: list[CompletionChoice] = []
    completion_tokens = 0
    for i, result in enumerate(results):
        echo = spec.echo_texts[i] if spec.echo_texts else ""
        for out in result.outputs:
            logprobs = None
            if spec.logprobs is not None:
                builder = LegacyLogprobs()
                if spec.echo_texts:
                    logprobs = _prompt_logprobs(job, i, result.prompt_logprobs, builder)
                    builder.offset = len(echo)
                gen = builder.build(out.logprobs or [], out.token_ids, job.state.tokenizer)
                if logprobs is None:
                    logprobs = gen
                else:
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(logprobs, name).extend(getattr(gen, name))
            choices.append(CompletionChoice(index=i * n + out.index, text=echo + out.text, logprobs=logprobs,
                                            finish_reason=out.finish_reason, stop_reason=out.stop_reason))
            completion_tokens += out.num_tokens
    choices.sort(key=lambda c: c.index)
    return CompletionResponse(id=job.request_id, created=job.created, model=job.model, choices=choices,
                              usage=job.usage(completion_tokens)).model_dump()


async def stream_completion(job: Job, spec: CompletionSpec) -> AsyncIterator[dict]:
    """The SSE chunk dicts: one per choice delta; a usage chunk last when asked."""
    n = job.params.n
    tokens: dict[int, int] = {}
    builders: dict[int, LegacyLogprobs] = {}
    prompt_lps: dict[int, list] = {}  # the engine sends them once per prompt, on its first output
    base = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model}
    async with aclosing(job.start()) as outputs:
        async for i, out in outputs:
            if out.prompt_logprobs is not None:
                prompt_lps.setdefault(i, out.prompt_logprobs)
            for c in out.outputs:
                index = i * n + c.index
                first = index not in tokens
                tokens[index] = c.num_tokens
                text, logprobs = c.text, None
                if first and spec.echo_texts:
                    text = spec.echo_texts[i] + text
                if spec.logprobs is not None:
                    if first:
                        builders[index] = LegacyLogprobs()
                    b = builders[index]
                    if first and spec.echo_texts:
                        logprobs = _prompt_logprobs(job, i, prompt_lps.get(i), b).model_dump()
                        b.offset = len(spec.echo_texts[i])
                    gen = b.build(c.logprobs or [], c.token_ids, job.state.tokenizer).model_dump()
                    if logprobs is None:
                        logprobs = gen
                    else:
                        for key in gen:
                            logprobs[key].extend(gen[key])
                if not text and logprobs is None and c.finish_reason is None:
                    continue  # tokens that do not yet decode to text (a split UTF-8 character)
                chunk = {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
                if spec.include_usage:
                    chunk["usage"] = (job.usage(sum(tokens.values())).model_dump()
                                      if spec.continuous_usage else None)
                yield chunk
    if spec.include_usage:
        yield {**base, "choices": [], "usage": job.usage(sum(tokens.values())).model_dump()}
