"""The asyncio twin of `EmberClient`: same methods, awaitable, streams as async iterators.

    async with AsyncEmberClient("http://127.0.0.1:8000") as client:
        async for chunk in client.completions_stream("Once upon a time", max_tokens=32):
            ...
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import httpx

from clients._common import (NO_RETRY, RETRY_STATUSES, EmberAPIError, RetryPolicy, SSEDecoder, body,
                             chunk_from_event, chunk_text, error_from_response)


class AsyncEmberClient:
    """Async client: completions, chat, models, tokenize, health; streams as async iterators of chunk dicts."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.retry = retry or RetryPolicy()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                       transport=transport, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncEmberClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- transport with retries -----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _send(self, method: str, path: str, json: Any = None, retry: RetryPolicy | None = None
                    ) -> AsyncIterator[httpx.Response]:
        policy = retry or self.retry
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=json)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.ConnectError:
                if attempt >= policy.max_retries:
                    raise
                await asyncio.sleep(policy.delay(attempt, None))
                attempt += 1
                continue
            try:
                if response.status_code >= 400:
                    await response.aread()
                    err = error_from_response(response.status_code, response.content,
                                              response.headers.get("retry-after"))
                    if response.status_code in RETRY_STATUSES and attempt < policy.max_retries:
                        await asyncio.sleep(policy.delay(attempt, err.retry_after))
                        attempt += 1
                        continue
                    raise err
                yield response
                return
            finally:
                await response.aclose()

    async def _json(self, method: str, path: str, json: Any = None) -> Any:
        async with self._send(method, path, json) as response:
            await response.aread()
            return response.json()

    async def _stream(self, path: str, payload: dict) -> AsyncIterator[dict]:
        async with self._send("POST", path, {**payload, "stream": True}) as response:
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is None:
                    continue
                chunk = chunk_from_event(event)
                if chunk is None:
                    return
                yield chunk

    # -- API ------------------------------------------------------------------------------------
    async def models(self) -> list[dict]:
        return (await self._json("GET", "/v1/models"))["data"]

    async def completions(self, prompt: Any, model: str | None = None, **params: Any) -> dict:
        return await self._json("POST", "/v1/completions", body(model or self.model, params, prompt=prompt))

    def completions_stream(self, prompt: Any, model: str | None = None, **params: Any) -> AsyncIterator[dict]:
        return self._stream("/v1/completions", body(model or self.model, params, prompt=prompt))

    async def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        return await self._json("POST", "/v1/chat/completions", body(model or self.model, params, messages=messages))

    def chat_stream(self, messages: list[dict], model: str | None = None, **params: Any) -> AsyncIterator[dict]:
        return self._stream("/v1/chat/completions", body(model or self.model, params, messages=messages))

    async def chat_text_stream(self, messages: list[dict], model: str | None = None, **params: Any
                               ) -> AsyncIterator[str]:
        """Only the text pieces of a streamed chat answer, as they arrive."""
        async for chunk in self.chat_stream(messages, model, **params):
            piece = chunk_text(chunk)
            if piece:
                yield piece

    async def tokenize(self, prompt: str, model: str | None = None, **params: Any) -> dict:
        return await self._json("POST", "/tokenize", body(model or self.model, params, prompt=prompt))

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        return (await self._json("POST", "/detokenize", body(model or self.model, {}, tokens=tokens)))["prompt"]

    async def health(self) -> bool:
        """True when the server is ready (no retries)."""
        try:
            async with self._send("GET", "/health", retry=NO_RETRY):
                return True
        except (EmberAPIError, httpx.HTTPError):
            return False

    async def metrics(self) -> str:
        async with self._send("GET", "/metrics") as response:
            await response.aread()
            return response.text


__all__ = ["AsyncEmberClient", "EmberAPIError", "RetryPolicy"]
