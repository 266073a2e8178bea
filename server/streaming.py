"""Server-sent events: chunk framing, errors inside a stream, and a response that always cleans up.

A stream ends with `data: [DONE]`. An error after the headers are sent cannot change the status,
so it travels as an `event: error` whose data is the usual error body, then `[DONE]`.
"""
from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.errors import EmberError
from server.errors import APIError, from_engine_error

log = logging.getLogger("ember.server")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(err: APIError) -> bytes:
    return b"event: error\n" + sse_data(err.body())


async def sse_events(chunks: AsyncIterator[dict], on_error: Callable[[APIError], None]) -> AsyncIterator[bytes]:
    """Frame chunk dicts as SSE; a failure mid-stream becomes an error event. Always ends with [DONE]."""
    try:
        async with aclosing(chunks) as items:
            async for chunk in items:
                yield sse_data(chunk)
    except APIError as exc:
        on_error(exc)
        yield sse_error(exc)
    except EmberError as exc:
        err = from_engine_error(exc)
        on_error(err)
        yield sse_error(err)
    except Exception as exc:  # noqa: BLE001 - the stream must still end cleanly
        log.exception("error while streaming")
        err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error", code="internal_error")
        on_error(err)
        yield sse_error(err)
    yield DONE


class EventStreamResponse(StreamingResponse):
    """An SSE response whose `on_close` runs however the stream ends: finished, failed, or the client
    gone before the first byte (when the body iterator never even starts, so its own cleanup cannot run).

    Starlette cancels the body iterator when the client disconnects; cancelling it closes the engine
    iterators inside, which aborts those requests.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
