"""The app factory: settings and (optionally) a prebuilt engine in, a FastAPI app out.

The engine starts in the lifespan and is warmed up with a one-token generation before the app
reports ready, so `/health` answers 200 only when a request would be served at once.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.admission import Admission
from server.disconnect import ClientDisconnected
from server.engine_loader import build_engine, model_dir, served_name
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.middleware import AccessLogMiddleware, APIKeyMiddleware, BodyLimitMiddleware
from server.models import ModelRegistry
from server.params import Limits, max_piece_chars
from server.lora import attach_adapters
from server.routes import lora, openai, ops, tokenize
from server.settings import ServerSettings
from server.state import ServerState

log = logging.getLogger("ember.server")


def _engine_model_path(engine: Any) -> Path | None:
    config = getattr(engine, "config", None) or getattr(getattr(engine, "engine", None), "config", None)
    model = getattr(config, "model", None)
    return Path(model) if model else None


def _max_model_len(engine: Any) -> int:
    inner = getattr(engine, "engine", engine)
    return int(getattr(engine, "max_model_len", None) or inner.max_model_len)


def _vocab_size(engine: Any) -> int:
    inner = getattr(engine, "engine", engine)
    model_vocab = getattr(getattr(inner, "model_config", None), "vocab_size", None)
    tok_vocab = engine.tokenizer.vocab_size
    return min(tok_vocab, model_vocab) if model_vocab else tok_vocab


async def _start_engine(state: ServerState, engine: Any, path: Path) -> Any:
    from engine.async_engine import AsyncEngine

    if engine is None:
        log.info("loading model from %s", path)
        engine = await asyncio.to_thread(build_engine, state.settings, path)
    async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine.from_engine(engine)
    await async_engine.start()
    return async_engine


async def _warm_up(engine: Any) -> None:
    """One short generation, so the first real request pays no first-step costs."""
    from engine.sampling import SamplingParams

    prompt = engine.tokenizer.encode("Hello") or [0]
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), request_id="warmup"):
        pass


def create_app(settings: ServerSettings | None = None, engine: Any = None) -> FastAPI:
    """Build the app. `engine` may be a loaded Engine or AsyncEngine; None loads `settings.model`."""
    settings = settings or ServerSettings()
    path = _engine_model_path(engine) if engine is not None else model_dir(settings)
    name = served_name(settings, path) if path is not None else (settings.served_model_name or "ember")
    metrics = ServerMetrics(name, stats=lambda: state.stats())  # `state` is bound below, before any scrape
    admission = Admission(settings.max_num_seqs + settings.max_queue, settings.retry_after, on_reject=metrics.reject)
    state = ServerState(settings=settings, models=ModelRegistry(name, str(path) if path else None),
                        metrics=metrics, admission=admission)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine = await _start_engine(state, engine, path)
        max_len = _max_model_len(state.engine)
        state.models.max_model_len = max_len
        vocab = _vocab_size(state.engine)
        state.limits = Limits.build(settings, max_len, vocab, max_piece_chars(state.engine.tokenizer, vocab))
        attach_adapters(state)
        await _warm_up(state.engine)
        state.ready = True
        log.info("ready: serving %s as %r (context %d tokens, up to %d running + %d queued requests)",
                 path, name, max_len, settings.max_num_seqs, settings.max_queue)
        try:
            yield
        finally:
            state.ready = False
            await state.engine.shutdown()

    app = FastAPI(title="Ember", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible inference server. Every error body is "
                              '{"error": {"message", "type", "param", "code"}}.')
    app.state.ember = state
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return JSONResponse({"error": {"message": "client closed the connection", "type": "invalid_request_error",
                                       "param": None, "code": "client_closed"}}, status_code=499)

    for router in (openai.router, tokenize.router, ops.router, lora.router):
        app.include_router(router)
    # Added innermost first: the access log sees everything, auth runs before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_key, public_routes=settings.public_routes,
                       on_reject=lambda: metrics.reject("auth"))
    # Routes by template, to label requests refused before routing (401, 413) with their route.
    templates = [r for r in app.router.routes if hasattr(r, "path")]
    templates += [r for router in (openai.router, tokenize.router, ops.router, lora.router) for r in router.routes]
    app.add_middleware(AccessLogMiddleware, state_getter=lambda: state, routes=lambda: templates)
    return app


def _version() -> str:
    return ops.ember_version()
