"""A small synchronous client for Ember (or any OpenAI-compatible server), built on httpx alone.

    client = EmberClient("http://127.0.0.1:8000", api_key="...")
    print(client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)["choices"][0]["message"]["content"])
    for piece in client.chat_text_stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)

429 and 503 answers (queue full, draining) and refused connections are retried with backoff,
honouring Retry-After; other errors raise EmberAPIError with the server's message.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import httpx

from clients._common import (NO_RETRY, RETRY_STATUSES, EmberAPIError, RetryPolicy, body, chunk_from_event,
                             chunk_text, error_from_response, iter_sse)


class EmberClient:
    """Sync client: completions, chat, models, tokenize, health; streaming as iterators of chunk dicts."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0, retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EmberClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport with retries -----------------------------------------------------------------
    @contextlib.contextmanager
    def _send(self, method: str, path: str, json: Any = None, retry: RetryPolicy | None = None
              ) -> Iterator[httpx.Response]:
        policy = retry or self.retry
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=json)
            try:
                response = self._http.send(request, stream=True)
            except httpx.ConnectError:
                if attempt >= policy.max_retries:
                    raise
                time.sleep(policy.delay(attempt, None))
                attempt += 1
                continue
            try:
                if response.status_code >= 400:
                    response.read()
                    err = error_from_response(response.status_code, response.content,
                                              response.headers.get("retry-after"))
                    if response.status_code in RETRY_STATUSES and attempt < policy.max_retries:
                        time.sleep(policy.delay(attempt, err.retry_after))
                        attempt += 1
                        continue
                    raise err
                yield response
                return
            finally:
                response.close()

    def _json(self, method: str, path: str, json: Any = None) -> Any:
        with self._send(method, path, json) as response:
            response.read()
            return response.json()

    def _stream(self, path: str, payload: dict) -> Iterator[dict]:
        with self._send("POST", path, {**payload, "stream": True}) as response:
            for event in iter_sse(response.iter_lines()):
                chunk = chunk_from_event(event)
                if chunk is None:
                    return
                yield chunk

    # -- API ------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def completions(self, prompt: Any, model: str | None = None, **params: Any) -> dict:
        return self._json("POST", "/v1/completions", body(model or self.model, params, prompt=prompt))

    def completions_stream(self, prompt: Any, model: str | None = None, **params: Any) -> Iterator[dict]:
        return self._stream("/v1/completions", body(model or self.model, params, prompt=prompt))

    def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        return self._json("POST", "/v1/chat/completions", body(model or self.model, params, messages=messages))

    def chat_stream(self, messages: list[dict], model: str | None = None, **params: Any) -> Iterator[dict]:
        return self._stream("/v1/chat/completions", body(model or self.model, params, messages=messages))

    def chat_text_stream(self, messages: list[dict], model: str | None = None, **params: Any) -> Iterator[str]:
        """Only the text pieces of a streamed chat answer, as they arrive."""
        for chunk in self.chat_stream(messages, model, **params):
            piece = chunk_text(chunk)
            if piece:
                yield piece

    def tokenize(self, prompt: str, model: str | None = None, **params: Any) -> dict:
        return self._json("POST", "/tokenize", body(model or self.model, params, prompt=prompt))

    def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        return self._json("POST", "/detokenize", body(model or self.model, {}, tokens=tokens))["prompt"]

    def health(self) -> bool:
        """True when the server is ready (no retries: a probe answers now or not at all)."""
        try:
            with self._send("GET", "/health", retry=NO_RETRY):
                return True
        except (EmberAPIError, httpx.HTTPError):
            return False

    def metrics(self) -> str:
        with self._send("GET", "/metrics") as response:
            response.read()
            return response.text


__all__ = ["EmberClient", "EmberAPIError", "RetryPolicy"]
