"""Helpers for tests against a live server: start one, read its metrics, wait for a state.

A uniquely named module (not conftest) so test files in several directories can import it safely.
"""
from __future__ import annotations

from pathlib import Path

import httpx

from server.settings import ServerSettings
from server.testing import serving

API_KEY = "sk-ember-test"


def running_server(model: Path, **overrides):
    """The app on a real uvicorn server on loopback, ready when entered."""
    options = dict(model=str(model), served_model_name="tiny", max_model_len=256, kv_cache_tokens=8192,
                   max_num_seqs=8)
    options.update(overrides)
    return serving(ServerSettings(**options))


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(sample name, frozenset of label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_until(url: str, predicate, timeout: float = 60.0) -> dict:
    """Scrape /metrics until `predicate(samples)` holds (a condition wait, not a fixed sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError("metrics never reached the expected state")
        time.sleep(0.02)


def engine_idle(samples: dict) -> bool:
    return (sample(samples, "ember_requests_running", model="tiny") == 0
            and sample(samples, "ember_requests_waiting", model="tiny") == 0)
