"""Per-request bookkeeping: feeds the Prometheus series and the request's structured log line.

`RequestRecord` belongs to one HTTP request (the access-log middleware writes it out as one JSON
line); `GenerationTracker` follows one engine request (one prompt) and updates both the record and
the metrics as outputs arrive.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from server.metrics import ServerMetrics


@dataclass
class RequestRecord:
    """What the log line says about a generation request beyond method, path and status."""

    request_id: str
    model: str
    adapter: str
    user: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time: float | None = None
    ttft: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    aborted: bool = False

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id, "model": self.model, "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "queue_time": _round(self.queue_time), "ttft": _round(self.ttft),
            "finish_reason": ",".join(sorted(set(self.finish_reasons))) or None,
        }
        if self.aborted:
            out["aborted"] = True
        if self.user:
            out["user"] = self.user
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class GenerationTracker:
    """Follows one engine request: token counters, latency histograms, finish reasons."""

    def __init__(self, metrics: ServerMetrics, record: RequestRecord, num_prompt_tokens: int):
        self.metrics = metrics
        self.record = record
        # Labelled children looked up once: observe() runs for every token.
        model, adapter = metrics.model, record.adapter
        self._generation_tokens = metrics.generation_tokens.labels(model, adapter)
        self._itl = metrics.itl.labels(model)
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.generated = 0
        self.started = False
        self.done = False

    def observe(self, out: Any) -> None:
        """Account one RequestOutput (deltas) from the engine."""
        m, model, adapter = self.metrics, self.metrics.model, self.record.adapter
        now = time.monotonic()
        if not self.started:
            self.started = True
            m.prompt_tokens.labels(model, adapter).inc(self.num_prompt_tokens)
            self.record.prompt_tokens += self.num_prompt_tokens
        new = sum(len(c.token_ids) for c in out.outputs)
        if new:
            if self.first_token is None:
                self.first_token = now
                ttft = now - self.arrival
                m.ttft.labels(model, adapter).observe(ttft)
                if self.record.ttft is None:
                    self.record.ttft = ttft
            elif self.last_token is not None:
                self._itl.observe(now - self.last_token)
            self.last_token = now
            self.generated += new
            self.record.completion_tokens += new
            self._generation_tokens.inc(new)
        for choice in out.outputs:
            if choice.finish_reason is not None:
                m.request_success.labels(model, adapter, choice.finish_reason).inc()
                self.record.finish_reasons.append(choice.finish_reason)
        if out.finished:
            self._finish(out, now)

    def _finish(self, out: Any, now: float) -> None:
        m, model = self.metrics, self.metrics.model
        self.done = True
        m.e2e.labels(model, self.record.adapter).observe(now - self.arrival)
        m.prompt_len.labels(model).observe(self.num_prompt_tokens)
        m.generation_len.labels(model).observe(self.generated)
        em = getattr(out, "metrics", None)
        scheduled = getattr(em, "first_scheduled_time", None)
        arrival = getattr(em, "arrival_time", None)
        if scheduled is not None and arrival is not None:
            queue = max(0.0, scheduled - arrival)
            m.queue_time.labels(model).observe(queue)
            self.record.queue_time = max(self.record.queue_time or 0.0, queue)

    def aborted(self) -> None:
        """The request left before finishing (client gone, or the server stopped it)."""
        if self.done:
            return
        self.done = True
        self.metrics.requests_aborted.labels(self.metrics.model).inc()
        self.record.aborted = True
