"""Schema pieces shared by the completions and chat endpoints: sampling fields, usage, errors.

Request models forbid unknown fields: a misspelt or unimplemented parameter is a 400 naming it,
never silently dropped. Floats refuse NaN and infinity.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# A JSON number the engine can take as a token id, a count or a seed.
INT64_MAX = 2**63 - 1

StopField = Annotated[
    str | list[str] | None,
    Field(None, description="up to `max_stop` strings; generation ends before (or, with "
                            "include_stop_str_in_output, after) the first one produced"),
]


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are errors; floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class ResponseModel(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(protected_namespaces=())


class StreamOptions(RequestModel):
    include_usage: bool | None = Field(None, description="send a last chunk with usage and empty choices")
    continuous_usage_stats: bool | None = Field(None, description="also put running usage in every chunk")


class SamplingFields(RequestModel):
    """Sampling parameters common to both generation endpoints (OpenAI's plus vLLM's extras)."""

    model: str | None = Field(None, description="served model name; default: the served model")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="choices per prompt, at most the server's `max_n`")
    stop: StopField = None
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id; logged, not otherwise used")
    # vLLM-style extras.
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="0 or -1 turns top-k off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1,
                          description="scheduling priority: lower runs first, and a waiting request may "
                                      "preempt running ones of a higher value (default 0)")


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    """The body of every failure."""

    error: ErrorInfo
