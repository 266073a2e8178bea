"""`POST /tokenize` and `POST /detokenize` with the served model's tokenizer (vLLM's shapes)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import bad_request
from server.params import check_token_ids
from server.protocol.misc import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.routes.openai import ERRORS
from server.serving_chat import chat_prompt
from server.state import get_state
from server.unsupported import check_messages

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a text, or of a conversation rendered through the chat template."""
    state = get_state(request)
    state.models.resolve(body.model)
    state.require_engine()
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of 'prompt' or 'messages'", "prompt")
    if body.messages is not None:
        check_messages(body)  # same refusals as the chat endpoint
        ids = chat_prompt(state, body.messages, body.add_generation_prompt)
    else:
        ids = state.tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.limits.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids."""
    state = get_state(request)
    state.models.resolve(body.model)
    state.require_engine()
    check_token_ids(body.tokens, state.limits, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))
