"""The app's shared state: settings, engine, model registry, metrics, admission. One per app."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.admission import Admission
from server.errors import APIError
from server.metrics import ServerMetrics
from server.models import ModelRegistry
from server.params import Limits
from server.settings import ServerSettings


@dataclass
class ServerState:
    """Everything a route needs, reachable as `request.app.state.ember`."""

    settings: ServerSettings
    models: ModelRegistry
    metrics: ServerMetrics
    admission: Admission
    engine: Any = None  # AsyncEngine once started
    limits: Limits | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def require_engine(self) -> Any:
        """The running engine, or 503 while it is loading or after it stopped."""
        if self.engine is None or not self.ready:
            raise APIError(503, "the model is not ready yet", type="service_unavailable", code="not_ready",
                           headers={"Retry-After": str(self.settings.retry_after)})
        if not getattr(self.engine, "is_running", True):
            raise APIError(503, "the engine has stopped; the server must be restarted", type="service_unavailable",
                           code="engine_dead")
        return self.engine

    def stats(self) -> Any | None:
        if self.engine is None:
            return None
        try:
            return self.engine.stats()
        except Exception:  # a scrape must never fail because the engine is mid-shutdown
            return None


def get_state(request: Request) -> ServerState:
    return request.app.state.ember
