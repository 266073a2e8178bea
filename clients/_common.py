"""What the sync and async clients share: errors, retry policy, SSE parsing, request bodies.

Nothing here performs I/O, so both clients use it unchanged.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

RETRY_STATUSES = (429, 503)


class EmberAPIError(Exception):
    """An error answer from the server: HTTP status plus the OpenAI-style error body's fields."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def from_body(cls, status: int, body: Any, retry_after: float | None = None) -> "EmberAPIError":
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return cls(status, str(body)[:500] or "error", retry_after=retry_after)
        return cls(status, str(err.get("message") or "error"), err.get("type"), err.get("param"), err.get("code"),
                   retry_after)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 / 503 answers and refused connections with exponential backoff and jitter.

    A `Retry-After` header, when present, sets the wait (capped at `max_delay`).
    """

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        backoff = self.base_delay * (2 ** attempt)
        return min(backoff * (0.5 + random.random() / 2), self.max_delay)


NO_RETRY = RetryPolicy(max_retries=0)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to backoff


def error_from_response(status: int, content: bytes, retry_after: str | None) -> EmberAPIError:
    try:
        body = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", "replace")
    return EmberAPIError.from_body(status, body, parse_retry_after(retry_after))


@dataclass
class ServerSentEvent:
    event: str | None
    data: str


class SSEDecoder:
    """Decodes SSE lines one at a time; `feed` returns an event when a blank line completes one."""

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            out = ServerSentEvent(self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = None, []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from SSE lines (`event:` and `data:` fields; a blank line ends an event)."""
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
    last = decoder.feed("")
    if last is not None:
        yield last


def chunk_from_event(event: ServerSentEvent) -> dict | None:
    """The JSON chunk of an event; None at `[DONE]`; an error event raises EmberAPIError."""
    if event.data.strip() == "[DONE]":
        return None
    payload = json.loads(event.data)
    if event.event == "error" or (isinstance(payload, dict) and "error" in payload and "choices" not in payload):
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        status = 500
        if isinstance(err, dict) and isinstance(err.get("code"), int):
            status = err["code"]
        raise EmberAPIError.from_body(status, payload)
    return payload


def body(model: str | None, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A request body: the given fields, the model when set, then any extra parameters."""
    out = {k: v for k, v in fields.items() if v is not None}
    if model is not None:
        out["model"] = model
    out.update(params)
    return out


def chunk_text(chunk: dict) -> str:
    """The text a completions or chat chunk adds (choice 0 or whichever choices are present)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if "delta" in choice:
            parts.append(choice["delta"].get("content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)
