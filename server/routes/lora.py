"""Adapter management: load (or reload) and unload LoRA / DoRA adapters while the server runs.

Both routes sit behind the API key like every other non-public route. Loading reads and checks the
files on a worker thread, so generation goes on meanwhile; unloading returns once the adapter's
in-flight requests have finished and its memory is freed.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from pydantic import Field

from engine.errors import InvalidRequestError
from server.errors import APIError
from server.lora import adapter_error, adapter_registry
from server.protocol.common import ErrorResponse, RequestModel, ResponseModel
from server.state import get_state

router = APIRouter()

UNLOAD_WAIT_S = 600.0  # longest an unload waits for in-flight requests before answering

ERRORS = {status: {"model": ErrorResponse, "description": text}
          for status, text in ((400, "invalid adapter, or adapters not enabled"), (401, "missing or wrong API key"),
                               (404, "adapter or adapter directory not found"))}


class LoadLoraAdapterRequest(RequestModel):
    lora_name: str = Field(description="the name clients then pass as `model`")
    lora_path: str = Field(description="adapter directory (PEFT layout), relative to the LoRA root or inside it")
    pinned: bool = Field(False, description="keep the adapter in a device slot, never evicted")


class UnloadLoraAdapterRequest(RequestModel):
    lora_name: str


class LoraAdapterResponse(ResponseModel):
    object: str = "lora_adapter"
    lora_name: str
    version: int | None = None
    rank: int | None = None
    use_dora: bool | None = None
    pinned: bool | None = None
    status: str = Field(description="loaded, reloaded, unloaded, or unloading (requests still running)")


@router.post("/v1/load_lora_adapter", response_model=LoraAdapterResponse, responses=ERRORS)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> LoraAdapterResponse:
    """Load an adapter under `lora_name`; loading a loaded name swaps versions atomically."""
    state = get_state(request)
    registry = adapter_registry(state)
    if body.lora_name == state.models.served_name:
        raise APIError(400, f"lora_name {body.lora_name!r} is the base model's served name; pick another name",
                       param="lora_name", code="invalid_adapter")
    reload = registry.has(body.lora_name)
    start = time.monotonic()
    try:
        info = await asyncio.to_thread(registry.load, body.lora_name, body.lora_path, body.pinned)
    except InvalidRequestError as exc:
        raise adapter_error(exc) from None
    state.metrics.lora_load.labels(state.metrics.model).observe(time.monotonic() - start)
    state.models.labels.label(info.name)
    return LoraAdapterResponse(lora_name=info.name, version=info.version, rank=info.rank, use_dora=info.use_dora,
                               pinned=info.pinned, status="reloaded" if reload else "loaded")


@router.post("/v1/unload_lora_adapter", response_model=LoraAdapterResponse, responses=ERRORS)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> LoraAdapterResponse:
    """Stop serving `lora_name` at once; answer when its running requests are done and its memory is freed."""
    registry = adapter_registry(get_state(request))
    try:
        freed = await asyncio.to_thread(registry.unload, body.lora_name, UNLOAD_WAIT_S)
    except InvalidRequestError as exc:
        raise adapter_error(exc) from None
    return LoraAdapterResponse(lora_name=body.lora_name, status="unloaded" if freed else "unloading")
