"""Pure ASGI middleware: access log + HTTP metrics, API-key auth, request body size limit.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
`receive` channel, which disconnect detection listens on, is not intercepted.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Callable

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError

request_log = logging.getLogger("ember.request")

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
QUIET_ROUTES = ("/health", "/live", "/metrics")  # probes and scrapes log at debug level


class AccessLogMiddleware:
    """One structured log line and one `ember_http_requests_total` increment per HTTP request."""

    def __init__(self, app: ASGIApp, state_getter: Callable[[], Any], routes: Callable[[], list] = list):
        self.app = app
        self.state_getter = state_getter
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500
        request_state = scope.setdefault("state", {})

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                record = request_state.get("record")
                if record is not None:
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-request-id", record.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record = request_state.get("record")
            if record is not None and record.aborted and status < 400:
                status = 499  # the client left; what was sent (if anything) is incomplete
            self._account(scope, status, time.monotonic() - start, record)

    def _account(self, scope: Scope, status: int, duration: float, record: Any) -> None:
        state = self.state_getter()
        route_path = _route_path(scope, self.routes())
        metrics = state.metrics
        metrics.http_requests.labels(route_path, scope["method"], str(status)).inc()
        if route_path in GENERATION_ROUTES and status >= 400 and not _is_rejection(status, state):
            metrics.requests_failed.labels(metrics.model, str(status)).inc()
        line: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "route": route_path,
                                "status": status, "duration": round(duration, 4)}
        client = scope.get("client")
        if client:
            line["client"] = client[0]
        if record is not None:
            line.update(record.fields())
        level = logging.DEBUG if route_path in QUIET_ROUTES else logging.INFO
        request_log.log(level, json.dumps(line, ensure_ascii=False))


def _route_path(scope: Scope, routes: list) -> str:
    """The matched route's template (a bounded label); requests stopped before routing are matched here."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def _is_rejection(status: int, state: Any) -> bool:
    # Counted in ember_requests_rejected_total instead (aborts in ember_requests_aborted_total).
    return status in (401, 429, 499) or (status == 503 and state.admission.draining)


class APIKeyMiddleware:
    """Bearer API keys, compared in constant time, on every route but the public ones."""

    def __init__(self, app: ASGIApp, keys: list[str], public_routes: list[str], on_reject: Callable[[], None]):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.public = set(public_routes)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.public or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        self.on_reject()
        err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        token = token.strip()
        # Compare against every key so the time taken does not reveal which (if any) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._too_large().response()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside body parsing; the app's handler turns it into the 413 body.
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
