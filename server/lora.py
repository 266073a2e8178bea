"""Adapters on the server side: bounded metric labels, the engine's adapter registry, errors in the API shape.

Label cardinality stays bounded: the first `cap` adapter names seen get their own `adapter` label
value (kept for the life of the process, so a series never changes meaning); any further name is
counted under "other". The base model is always "base".
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from engine.errors import InvalidRequestError
from server.errors import APIError

OTHER = "other"


class AdapterLabels:
    """Adapter name -> `adapter` label value, at most `cap` distinct names, the rest "other"."""

    def __init__(self, cap: int, on_new: Callable[[str], None] | None = None):
        self.cap = cap
        self.on_new = on_new  # called once per new label value (pre-creates its series)
        self._own: set[str] = set()
        self._other_used = False
        self._lock = threading.Lock()

    def label(self, name: str) -> str:
        with self._lock:
            if name in self._own:
                return name
            if len(self._own) < self.cap:
                self._own.add(name)
                value, fresh = name, True
            else:
                value, fresh = OTHER, not self._other_used
                self._other_used = True
        if fresh and self.on_new is not None:
            self.on_new(value)
        return value


def label_cap(max_loras: int) -> int:
    """Distinct adapter label values: twice the adapters one batch can mix, at least 8."""
    return max(8, 2 * max_loras)


def adapter_registry(state: Any) -> Any:
    """The engine's AdapterRegistry, or a 400 saying how to turn adapters on."""
    registry = state.models.adapters
    if registry is None:
        state.require_engine()  # 503 while loading, rather than a misleading 400
        raise APIError(400, "adapters are not enabled on this server; start it with --enable-lora --lora-root DIR",
                       code="lora_disabled")
    return registry


def adapter_error(exc: InvalidRequestError) -> APIError:
    """404 for a missing adapter or directory, 400 for everything else; the message names the problem."""
    from engine.adapter_paths import AdapterNotFoundError

    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, exc.message, param=exc.param, code="adapter_not_found")
    return APIError(400, exc.message, param=exc.param, code="invalid_adapter")


def attach_adapters(state: Any) -> None:
    """Point model-name resolution at the engine's adapters (if any) and label the preloaded ones."""
    registry = getattr(getattr(state.engine, "engine", state.engine), "adapters", None)
    if registry is None:
        return
    state.models.adapters = registry
    state.models.labels = AdapterLabels(label_cap(registry.config.max_loras), on_new=state.metrics.add_adapter)
    for info in registry.adapters():
        state.models.labels.label(info.name)
