"""Explicit decisions on OpenAI parameters Ember does not implement.

A value that would change the output if honoured is refused with a 400 naming the parameter;
neutral values (null, empty, "none", "text", "auto") pass. The decisions, per parameter:

completions: best_of (only unset or equal to n), suffix (only null or "").
chat: tools / functions (only empty), tool_choice / function_call (only "none"), parallel_tool_calls
(only null), response_format (only type "text"), audio / prediction / reasoning_effort / verbosity /
web_search_options (only null), modalities (only ["text"]), store (only false), metadata (only with
store, so only empty), service_tier (only "auto" or "default"); message roles `tool` / `function`,
assistant `tool_calls` / `function_call` and non-text content parts are refused too.
Accepted as hints without effect: user, safety_identifier, prompt_cache_key.
"""
from __future__ import annotations

from typing import Any

from server.errors import APIError, unsupported
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest

NO_TOOLS = "tool and function calling is not supported"


def check_completion(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of != req.n:
        raise unsupported("best_of", "only best_of equal to n is supported; every choice is returned")
    if req.suffix:
        raise unsupported("suffix", "insertion (suffix) is not supported")


def check_chat(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise unsupported("tools", NO_TOOLS)
    if req.functions:
        raise unsupported("functions", NO_TOOLS)
    for name in ("tool_choice", "function_call"):
        value = getattr(req, name)
        if value is not None and value != "none":
            raise unsupported(name, NO_TOOLS)
    if req.parallel_tool_calls is not None:
        raise unsupported("parallel_tool_calls", NO_TOOLS)
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported("response_format", f"response_format type {req.response_format.type!r}: "
                                             "only 'text' is supported, no JSON mode or schemas")
    for name, why in (("audio", "audio output is not supported"),
                      ("prediction", "predicted outputs are not supported"),
                      ("reasoning_effort", "this model has no reasoning mode"),
                      ("verbosity", "this model has no verbosity control"),
                      ("web_search_options", "web search is not supported")):
        if getattr(req, name) is not None:
            raise unsupported(name, why)
    if req.modalities is not None and req.modalities != ["text"]:
        raise unsupported("modalities", "only ['text'] output is supported")
    if req.store:
        raise unsupported("store", "stored completions are not supported")
    if req.metadata:
        raise unsupported("metadata", "metadata is only used with store, which is not supported")
    if req.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "only 'auto' or 'default'")
    check_messages(req)


def check_messages(req: ChatCompletionRequest | Any) -> None:
    """Refuse message roles, fields and content parts that need features Ember lacks."""
    for i, msg in enumerate(req.messages):
        if msg.role in ("tool", "function"):
            raise unsupported(f"messages[{i}].role", f"role {msg.role!r}: {NO_TOOLS}")
        if msg.tool_calls:
            raise unsupported(f"messages[{i}].tool_calls", NO_TOOLS)
        if msg.function_call:
            raise unsupported(f"messages[{i}].function_call", NO_TOOLS)
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type != "text":
                    raise unsupported(f"messages[{i}].content[{j}].type",
                                      f"content type {part.type!r}: only text is supported")
                if part.text is None:
                    raise APIError(400, "a text content part needs 'text'", param=f"messages[{i}].content[{j}].text",
                                   code="missing_required_parameter")
