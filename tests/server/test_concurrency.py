"""50 concurrent streaming clients; a third leave mid-stream and a few while still queued.

Afterwards nothing may be left behind: no running or waiting request, KV blocks back to the
baseline, and every departure counted as an abort (none as a success).
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from live_helpers import engine_idle, running_server, sample, scrape, wait_until

FULL_TOKENS = 40  # clients that read to the end
LONG_TOKENS = 200  # clients that leave: long enough that they cannot finish before the server notices


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, max_num_seqs=4, max_queue=100) as srv:
        yield srv


async def _events(response: httpx.Response):
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield None if data == "[DONE]" else json.loads(data)


async def _client(http: httpx.AsyncClient, i: int, kind: str, admitted: asyncio.Event, release: asyncio.Event,
                  results: dict) -> None:
    body = {"messages": [{"role": "user", "content": f"story number {i}"}], "stream": True, "temperature": 0,
            "ignore_eos": True, "max_tokens": FULL_TOKENS if kind == "full" else LONG_TOKENS}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = _events(response)
        first = await anext(events)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        admitted.set()  # the role delta comes once the request is in the engine's queue
        if kind == "queued":
            await release.wait()
            results[i] = "left while queued"
            return  # leaving the block closes the connection
        content, reasons = [], []
        async for chunk in events:
            if chunk is None:
                break
            choice = chunk["choices"][0]
            content.append(choice["delta"].get("content", ""))
            if choice["finish_reason"]:
                reasons.append(choice["finish_reason"])
            if kind == "mid" and len(content) == 2:
                results[i] = "left mid-stream"
                return
        results[i] = (reasons, "".join(content))


async def _run(url: str) -> tuple[dict, float]:
    kinds = ["mid" if i % 3 == 0 or i in (1, 2) else "full" for i in range(45)] + ["queued"] * 5
    admitted = [asyncio.Event() for _ in kinds]
    release = asyncio.Event()
    results: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        first = [asyncio.create_task(_client(http, i, kinds[i], admitted[i], release, results)) for i in range(45)]
        await asyncio.gather(*(admitted[i].wait() for i in range(45)))
        # All 45 earlier requests are in the engine ahead of these five, which get in line behind them.
        last = [asyncio.create_task(_client(http, i, kinds[i], admitted[i], release, results)) for i in range(45, 50)]
        await asyncio.gather(*(admitted[i].wait() for i in range(45, 50)))
        waiting = sample(await asyncio.to_thread(scrape, url), "ember_requests_waiting", model="tiny")
        release.set()
        await asyncio.gather(*first, *last)
    return results, waiting


def test_fifty_streams_with_disconnects_leave_nothing_behind(server):
    before = scrape(server.url)
    kv_baseline = sample(before, "ember_kv_cache_usage_ratio", model="tiny")
    results, waiting_at_release = asyncio.run(_run(server.url))

    # The five late requests were still queued when they left: at least five waited behind the others.
    assert waiting_at_release >= 5, waiting_at_release
    finished = [r for r in results.values() if isinstance(r, tuple)]
    assert len(finished) == 28 and sum(1 for r in results.values() if r == "left mid-stream") == 17
    for reasons, text in finished:
        assert reasons == ["length"]

    after = wait_until(server.url, engine_idle)
    assert sample(after, "ember_kv_cache_usage_ratio", model="tiny") == kv_baseline

    def delta(name, **labels):
        return sample(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    # Wait for the aborts to be counted too (the last disconnects may still be on their way).
    after = wait_until(server.url, lambda s: sample(s, "ember_requests_aborted_total", model="tiny")
                       - sample(before, "ember_requests_aborted_total", model="tiny") >= 22)
    assert delta("ember_requests_aborted_total", model="tiny") == 22
    assert delta("ember_request_success_total", model="tiny", adapter="base", finish_reason="length") == 28
    assert engine_idle(after)
