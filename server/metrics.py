"""Prometheus metrics, one registry per app (two apps in one process never share a series).

Dashboards and alerts are built on exactly these names. Labels stay bounded: `model` is the served
name, `adapter` is "base" or a loaded adapter's name, `route` is the route template.
Values the engine already counts (running, waiting, KV usage, preemptions, prefix-cache tokens,
adapters) are read from `engine.stats()` at scrape time by a collector, never copied by hand.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

BASE = "base"
REJECT_REASONS = ("queue_full", "draining", "auth")
FINISH_REASONS = ("stop", "length", "abort")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineStatsCollector(Collector):
    """Gauges and engine-owned counters, read from `stats()` on every scrape."""

    def __init__(self, model: str, stats: Callable[[], Any | None]):
        self.model = model
        self.stats = stats

    def describe(self) -> Iterable[Any]:
        # Names only: registration must not call into an engine that may not exist yet.
        return self._families(None)

    def collect(self) -> Iterable[Any]:
        return self._families(self.stats())

    def _families(self, s: Any | None) -> Iterable[Any]:
        get = (lambda name: getattr(s, name, 0) or 0) if s is not None else (lambda name: 0)
        total = get("kv_blocks_total")
        usage = get("kv_blocks_used") / total if total else 0.0
        for name, doc, value in (
            ("ember_requests_running", "Requests in the engine's running batch.", get("num_running")),
            ("ember_requests_waiting", "Requests admitted and waiting for the engine.", get("num_waiting")),
            ("ember_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", usage),
            ("ember_lora_adapters_resident", "LoRA adapters loaded in memory.", get("lora_adapters_resident")),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric([self.model], float(value))
            yield g
        for name, doc, value in (
            ("ember_preemptions", "Requests preempted to free KV cache blocks.", get("num_preemptions")),
            ("ember_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", get("prefix_cache_queries")),
            ("ember_prefix_cache_hits", "Prompt tokens found in the prefix cache.", get("prefix_cache_hits")),
            ("ember_lora_evictions", "LoRA adapters evicted from memory.", get("lora_evictions")),
        ):
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([self.model], float(value))
            yield c


class ServerMetrics:
    """The server-side series; `render()` gives the exposition text."""

    def __init__(self, model: str, stats: Callable[[], Any | None]):
        self.model = model
        disable_created_metrics()  # no `*_created` series: they double the scrape size and nobody charts them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m, ma = ["model"], ["model", "adapter"]
        self.prompt_tokens = Counter("ember_prompt_tokens", "Prompt tokens processed.", ma, registry=r)
        self.generation_tokens = Counter("ember_generation_tokens", "Tokens generated.", ma, registry=r)
        self.request_success = Counter("ember_request_success", "Finished choices by finish reason.",
                                       ma + ["finish_reason"], registry=r)
        self.requests_aborted = Counter("ember_requests_aborted", "Requests aborted (client went away).", m,
                                        registry=r)
        self.requests_failed = Counter("ember_requests_failed", "Generation requests that ended in an error.",
                                       m + ["status"], registry=r)
        self.requests_rejected = Counter("ember_requests_rejected", "Requests refused before admission.",
                                         m + ["reason"], registry=r)
        self.http_requests = Counter("ember_http_requests", "HTTP requests by route, method and status.",
                                     ["route", "method", "status"], registry=r)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time from arrival to the first token.", ma,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between consecutive token outputs.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("ember_e2e_request_latency_seconds", "Time from arrival to the last token.", ma,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("ember_request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    m, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("ember_request_prompt_tokens", "Prompt length of finished requests.", m,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.generation_len = Histogram("ember_request_generation_tokens", "Tokens generated per finished request.",
                                        m, buckets=TOKEN_BUCKETS, registry=r)
        self.lora_load = Histogram("ember_lora_load_seconds", "Time to load a LoRA adapter.", m,
                                   buckets=LOAD_BUCKETS, registry=r)
        r.register(EngineStatsCollector(model, stats))
        self.add_adapter(BASE)

    def add_adapter(self, adapter: str) -> None:
        """Create every labelled series of one adapter at 0, so it exists before its first request."""
        model = self.model
        self.prompt_tokens.labels(model, adapter)
        self.generation_tokens.labels(model, adapter)
        for reason in FINISH_REASONS:
            self.request_success.labels(model, adapter, reason)
        self.ttft.labels(model, adapter)
        self.e2e.labels(model, adapter)
        if adapter != BASE:
            return
        self.requests_aborted.labels(model)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(model, reason)
        for h in (self.itl, self.queue_time, self.prompt_len, self.generation_len, self.lora_load):
            h.labels(model)

    def reject(self, reason: str) -> None:
        self.requests_rejected.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
