"""Admission: a bounded queue answers 429 at once, draining answers 503, and a client that leaves a
non-streaming request (queued or decoding) aborts it in the engine."""
from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from live_helpers import engine_idle, running_server, sample, scrape, wait_until

CHAT = [{"role": "user", "content": "a long story please"}]
# Long enough (thousands of steps) to be still running when the next request arrives.
LONG = {"messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, max_num_seqs=2, max_queue=2, retry_after=3, max_model_len=2048,
                        kv_cache_tokens=8192) as srv:
        yield srv


@contextlib.contextmanager
def held_streams(http: httpx.Client, count: int):
    """`count` long streaming requests, each admitted (its role delta read) and left open."""
    readers = []  # kept alive: a line iterator that is garbage-collected closes its response
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            response = stack.enter_context(http.stream("POST", "/v1/chat/completions", json=LONG))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            assert '"role":"assistant"' in next(line for line in readers[-1] if line.startswith("data: "))
        yield
    # Leaving closed every connection: the server aborts the requests.


def test_full_queue_answers_429_at_once(server):
    before = scrape(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with held_streams(http, 4):  # 2 running + 2 queued = capacity
            r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            err = r.json()["error"]
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error" and "capacity" in err["message"]
            r = http.post("/v1/chat/completions", json={**LONG, "max_tokens": 1})
            assert r.status_code == 429  # a stream is refused before it starts, with a plain error body
        wait_until(server.url, engine_idle)
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    after = scrape(server.url)
    rejected = ("ember_requests_rejected_total", frozenset({"model": "tiny", "reason": "queue_full"}.items()))
    assert after[rejected] - before[rejected] == 2
    assert sample(after, "ember_kv_cache_usage_ratio", model="tiny") == 0


def _aborted(samples: dict) -> float:
    return sample(samples, "ember_requests_aborted_total", model="tiny")


async def _leave_non_streaming(url: str, body: dict, in_engine) -> None:
    """Send a non-streaming request, wait until the engine shows it (`in_engine`), then hang up."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        task = asyncio.create_task(http.post("/v1/completions", json=body))
        await asyncio.to_thread(wait_until, url, in_engine)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_non_streaming_client_leaving_while_queued_aborts(server):
    with httpx.Client(base_url=server.url, timeout=60) as http, held_streams(http, 2):
        base = _aborted(scrape(server.url))
        asyncio.run(_leave_non_streaming(server.url, {"prompt": "queued", "max_tokens": 5},
                                         lambda s: sample(s, "ember_requests_waiting", model="tiny") == 1))
        after = wait_until(server.url, lambda s: sample(s, "ember_requests_waiting", model="tiny") == 0)
        assert _aborted(after) == base + 1
        assert sample(after, "ember_requests_running", model="tiny") == 2  # the held streams go on
    wait_until(server.url, engine_idle)


def test_non_streaming_client_leaving_while_decoding_aborts(server):
    before = scrape(server.url)
    tokens = ("ember_generation_tokens_total", frozenset({"model": "tiny", "adapter": "base"}.items()))
    asyncio.run(_leave_non_streaming(server.url, {"prompt": "decoding", "max_tokens": 2000, "ignore_eos": True},
                                     lambda s: s[tokens] > before[tokens]))
    after = wait_until(server.url, lambda s: engine_idle(s) and _aborted(s) == _aborted(before) + 1)
    assert after[tokens] - before[tokens] < 2000
    success = ("ember_request_success_total",
               frozenset({"model": "tiny", "adapter": "base", "finish_reason": "length"}.items()))
    assert after[success] == before[success]
    assert sample(after, "ember_kv_cache_usage_ratio", model="tiny") == 0


def test_draining_answers_503(server):
    admission = server.app.state.ember.admission
    admission.start_draining()
    try:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "draining"
        assert httpx.get(server.url + "/live").status_code == 200
        rejected = sample(scrape(server.url), "ember_requests_rejected_total", model="tiny", reason="draining")
        assert rejected == 1
    finally:
        admission.draining = False
