"""Schemas of `POST /v1/completions` (OpenAI's legacy completions API)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from server.protocol.common import INT64_MAX, ResponseModel, SamplingFields, UsageInfo

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]], Field(min_length=1)]
PromptField = (Annotated[str, Field()]
               | Annotated[list[str], Field(min_length=1)]
               | TokenIds
               | Annotated[list[TokenIds], Field(min_length=1)])


class CompletionRequest(SamplingFields):
    """A completions request. `prompt` is text, a list of texts, token ids or a list of token-id lists."""

    prompt: PromptField = Field(..., description="text, list of texts, token ids, or list of token-id lists")
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX, description="0 is allowed with echo (scoring)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token (OpenAI allows 5, Ember 20)")
    best_of: int | None = Field(None, ge=1, le=128, description="only equal to n (or unset) is supported")
    suffix: str | None = Field(None, description="not supported: only null or empty")


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = Field(None, description="the stop string or token id that ended the choice")


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of a streamed completion (same shape; `usage` only on the last with include_usage)."""
