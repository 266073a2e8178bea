"""Schemas of the small endpoints: models, tokenize, detokenize, health, version."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from server.protocol.chat import ChatMessage
from server.protocol.common import INT64_MAX, RequestModel, ResponseModel


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ember"
    root: str | None = Field(None, description="the checkpoint the model was loaded from")
    parent: str | None = Field(None, description="for an adapter: the base model's name")
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestModel):
    """Either `prompt` (text) or `messages` (rendered through the chat template), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="for `prompt`: add BOS as the checkpoint does")
    add_generation_prompt: bool = Field(True, description="for `messages`: end with the assistant turn's opening")
    return_token_strs: bool = False


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
    skip_special_tokens: bool = True


class DetokenizeResponse(ResponseModel):
    prompt: str


class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(ResponseModel):
    version: str
