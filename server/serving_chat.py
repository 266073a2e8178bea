"""`POST /v1/chat/completions`: messages through the checkpoint's chat template, then generation.

A stream opens with one role delta per choice (sent at admission, before the first token), then
content deltas; each choice's finish_reason comes once; with `stream_options.include_usage` a last
chunk carries usage and no choices.
"""
from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from server.errors import bad_request
from server.job import Job, new_id, new_record
from server.logprobs import chat_logprobs
from server.params import check_prompt_length, check_text_size, resolve_max_tokens, sampling_params
from server.protocol.chat import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage
from server.state import ServerState
from server.unsupported import check_chat


@dataclass
class ChatSpec:
    """How to present a chat job's outputs."""

    top_logprobs: int | None  # None: no logprobs
    include_usage: bool
    continuous_usage: bool


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for the chat template; text parts joined, `developer` spoken as `system`."""
    out = []
    for msg in messages:
        if isinstance(msg.content, list):
            content = "".join(part.text or "" for part in msg.content)
        else:
            content = msg.content or ""
        entry: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
        if msg.name:
            entry["name"] = msg.name
        out.append(entry)
    return out


def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """Token ids of the rendered conversation; template errors arrive as InvalidRequestError (400)."""
    return state.tokenizer.encode_chat(template_messages(messages), add_generation_prompt=add_generation_prompt)


def prepare_chat(state: ServerState, req: ChatCompletionRequest, request: Request) -> tuple[Job, ChatSpec]:
    """Validate, render and tokenize; every problem is a 400 that names the parameter."""
    target = state.models.resolve(req.model)
    check_chat(req)
    state.require_engine()
    limits = state.limits
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    check_text_size(sum(len(m["content"]) for m in template_messages(req.messages)), limits, "messages")
    prompt = chat_prompt(state, req.messages, req.add_generation_prompt)
    check_prompt_length(len(prompt), limits, "messages")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(requested, requested is not None, None, len(prompt), limits, param)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, limits, max_tokens, top)
    request_id = new_id("chatcmpl")
    user = req.user or req.safety_identifier
    job = Job(state, target, request_id, [prompt], params, new_record(state, request, target, request_id, user),
              priority=req.priority)
    opts = req.stream_options
    return job, ChatSpec(top_logprobs=top, include_usage=bool(opts and opts.include_usage),
                         continuous_usage=bool(opts and opts.continuous_usage_stats))


async def chat_complete(job: Job, spec: ChatSpec) -> dict:
    """Run the job to the end and build the response body."""
    (result,) = await job.collect()
    choices = []
    for out in result.outputs:
        logprobs = chat_logprobs(out.logprobs or [], spec.top_logprobs) if spec.top_logprobs is not None else None
        choices.append(ChatChoice(index=out.index, message=AssistantMessage(content=out.text), logprobs=logprobs,
                                  finish_reason=out.finish_reason, stop_reason=out.stop_reason))
    completion_tokens = sum(out.num_tokens for out in result.outputs)
    return ChatCompletionResponse(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                  usage=job.usage(completion_tokens)).model_dump()


async def stream_chat(job: Job, spec: ChatSpec) -> AsyncIterator[dict]:
    """The SSE chunk dicts: role deltas first, then one chunk per choice delta, then usage if asked."""
    tokens = {j: 0 for j in range(job.params.n)}
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}

    def chunk(choice: dict) -> dict:
        out = {**base, "choices": [choice]}
        if spec.include_usage:
            out["usage"] = job.usage(sum(tokens.values())).model_dump() if spec.continuous_usage else None
        return out

    async with aclosing(job.start()) as outputs:
        await outputs.started()  # the role deltas below then mean "queued in the engine"
        for j in tokens:
            yield chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        async for _, out in outputs:
            for c in out.outputs:
                tokens[c.index] = c.num_tokens
                logprobs = None
                if spec.top_logprobs is not None and c.logprobs:
                    logprobs = chat_logprobs(c.logprobs, spec.top_logprobs).model_dump()
                if not c.text and logprobs is None and c.finish_reason is None:
                    continue  # tokens that do not yet decode to text (a split UTF-8 character)
                delta = {"content": c.text} if c.text else {}
                yield chunk({"index": c.index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    if spec.include_usage:
        yield {**base, "choices": [], "usage": job.usage(sum(tokens.values())).model_dump()}
