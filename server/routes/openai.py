"""The OpenAI-compatible routes: completions, chat completions, models."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from server.job import respond
from server.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from server.protocol.common import ErrorResponse
from server.protocol.completions import CompletionRequest, CompletionResponse, CompletionStreamResponse
from server.protocol.misc import ModelCard, ModelList
from server.serving_chat import chat_complete, prepare_chat, stream_chat
from server.serving_completions import complete, prepare_completion, stream_completion
from server.state import get_state

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                         (413, "body too large"), (429, "queue full (see Retry-After)"),
                         (503, "draining or not ready"))
}


def _generation_responses(body_model: type, chunk_model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": body_model, "description": "the result; with stream=true an SSE stream of "
                                                       f"{chunk_model.__name__} chunks ending with data: [DONE]",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **ERRORS}


@router.post("/v1/completions", responses=_generation_responses(CompletionResponse, CompletionStreamResponse),
             response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    """Complete one or more prompts (text or token ids)."""
    # Validation and tokenization run in a worker thread: a long prompt must not stall the event
    # loop that streams every other response.
    job, spec = await run_in_threadpool(prepare_completion, get_state(request), body, request)
    stream = stream_completion(job, spec) if body.stream else None
    return await respond(job, request, lambda: complete(job, spec), stream)


@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk),
             response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    """Continue a conversation rendered through the model's chat template."""
    job, spec = await run_in_threadpool(prepare_chat, get_state(request), body, request)  # as above
    stream = stream_chat(job, spec) if body.stream else None
    return await respond(job, request, lambda: chat_complete(job, spec), stream)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    """The models this server answers to."""
    return ModelList(data=get_state(request).models.cards())


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """One model by name; 404 if this server does not serve it."""
    state = get_state(request)
    target = state.models.resolve(model)
    return next(card for card in state.models.cards() if card.id == target.model)
