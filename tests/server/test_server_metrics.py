"""Prometheus metrics: every documented series exists from startup and moves with traffic."""
from __future__ import annotations

import httpx
import pytest

from live_helpers import API_KEY, running_server, sample, scrape

BASE = {"model": "tiny"}
BASE_ADAPTER = {"model": "tiny", "adapter": "base"}
GAUGES = ["ember_requests_running", "ember_requests_waiting", "ember_kv_cache_usage_ratio",
          "ember_lora_adapters_resident"]
COUNTERS_MODEL = ["ember_requests_aborted_total", "ember_preemptions_total", "ember_prefix_cache_queries_total",
                  "ember_prefix_cache_hits_total", "ember_lora_evictions_total"]
COUNTERS_ADAPTER = ["ember_prompt_tokens_total", "ember_generation_tokens_total"]
HISTOGRAMS_ADAPTER = ["ember_time_to_first_token_seconds", "ember_e2e_request_latency_seconds"]
HISTOGRAMS_MODEL = ["ember_inter_token_latency_seconds", "ember_request_queue_time_seconds",
                    "ember_request_prompt_tokens", "ember_request_generation_tokens", "ember_lora_load_seconds"]


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, api_key=[API_KEY]) as srv:
        yield srv


def test_every_series_exists_at_startup(server):
    s = scrape(server.url)  # /metrics is public: no key needed
    for name in GAUGES + ["ember_requests_aborted_total"]:
        assert sample(s, name, **BASE) == 0.0, name
    for name in COUNTERS_MODEL:  # engine-owned: the warm-up request may already count
        assert sample(s, name, **BASE) >= 0.0, name
    for name in COUNTERS_ADAPTER:
        assert sample(s, name, **BASE_ADAPTER) == 0.0, name
    for reason in ("stop", "length", "abort"):
        assert sample(s, "ember_request_success_total", finish_reason=reason, **BASE_ADAPTER) == 0.0
    for reason in ("queue_full", "draining", "auth"):
        assert sample(s, "ember_requests_rejected_total", reason=reason, **BASE) == 0.0
    for name in HISTOGRAMS_ADAPTER:
        assert sample(s, name + "_count", **BASE_ADAPTER) == 0.0, name
    for name in HISTOGRAMS_MODEL:
        assert sample(s, name + "_count", **BASE) == 0.0, name


def test_counters_follow_requests(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = scrape(server.url)
    r = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                   json={"prompt": [3, 4, 5, 6], "max_tokens": 5, "n": 2, "ignore_eos": True})
    assert r.status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    bad = httpx.post(server.url + "/v1/completions", headers=headers, json={"prompt": "x", "n": 0})
    assert bad.status_code == 400
    after = scrape(server.url)

    def delta(name, **labels):
        return sample(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    assert delta("ember_prompt_tokens_total", **BASE_ADAPTER) == 4
    assert delta("ember_generation_tokens_total", **BASE_ADAPTER) == 10
    assert delta("ember_request_success_total", finish_reason="length", **BASE_ADAPTER) == 2
    assert delta("ember_time_to_first_token_seconds_count", **BASE_ADAPTER) == 1
    assert delta("ember_e2e_request_latency_seconds_count", **BASE_ADAPTER) == 1
    assert delta("ember_request_generation_tokens_sum", **BASE) == 10
    assert delta("ember_request_prompt_tokens_sum", **BASE) == 4
    assert delta("ember_request_queue_time_seconds_count", **BASE) == 1
    assert delta("ember_inter_token_latency_seconds_count", **BASE) == 4  # 5 steps: 4 gaps
    assert delta("ember_requests_rejected_total", reason="auth", **BASE) == 1
    assert delta("ember_requests_failed_total", status="400", **BASE) == 1
    assert delta("ember_http_requests_total", route="/v1/completions", method="POST", status="200") == 1
    assert delta("ember_http_requests_total", route="/v1/models", method="GET", status="401") == 1
    assert delta("ember_prefix_cache_queries_total", **BASE) >= 4
    assert sample(after, "ember_requests_running", **BASE) == 0
    assert sample(after, "ember_kv_cache_usage_ratio", **BASE) == 0


def test_request_id_header_and_log_line(server):
    import json
    import logging
    import threading

    # The access line is written once the response has gone out, so wait for it rather than read at once.
    lines, arrived = [], threading.Event()

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(record.getMessage()))
            arrived.set()

    logger = logging.getLogger("ember.request")
    handler, old_level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "alice"},
                       timeout=60)
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert rid == r.json()["id"]
        mine = []
        while not mine and arrived.wait(timeout=10):
            arrived.clear()
            mine = [line for line in list(lines) if line.get("request_id") == rid]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(mine) == 1
    line = mine[0]
    assert line["status"] == 200 and line["route"] == "/v1/chat/completions" and line["user"] == "alice"
    assert line["model"] == "tiny" and line["adapter"] == "base"
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["ttft"] is not None and line["queue_time"] is not None and line["finish_reason"]
