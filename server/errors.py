"""One error contract: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

Handlers here turn FastAPI's validation errors, Starlette's HTTP errors, the engine's errors and any
unexpected exception into that body, so clients (the openai SDK among them) always find the same shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import ContextLengthError, EmberError, EngineDeadError, InvalidRequestError

log = logging.getLogger("ember.server")


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> APIError:
    """A parameter OpenAI defines that Ember does not implement: refused, never silently ignored."""
    tail = f" ({why})" if why else ""
    return APIError(400, f"'{param}' is not supported by this server{tail}", param=param, code="unsupported_parameter")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def from_engine_error(exc: EmberError) -> APIError:
    """Map an engine exception to its HTTP error."""
    if isinstance(exc, ContextLengthError):
        return APIError(400, exc.message, param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param, code="invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine has stopped: {exc}", type="service_unavailable", code="engine_dead")
    return APIError(500, f"the engine failed on this request: {exc}", type="server_error", code="engine_error")


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    # Union members appear in locations as type names ("str", "list[int]"); they are not fields.
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "function-after")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first validation problem, naming the parameter."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    param = _param_from_loc(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid value"))
    if kind == "missing":
        return bad_request(f"'{param}' is a required parameter", param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, code="unknown_parameter")
    if kind in ("json_invalid", "model_attributes_type", "dict_type") and param is None:
        return bad_request(f"The request body is not a valid JSON object: {msg}", None, code="invalid_json")
    msg = msg.removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {msg}" if param else msg, param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure through the one error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        err = APIError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                       type="invalid_request_error" if exc.status_code < 500 else "server_error",
                       headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(EmberError)
    async def _engine(request: Request, exc: EmberError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error",
                        code="internal_error").response()
