"""The httpx clients: against the live server, and retry behaviour against a scripted transport."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from clients import AsyncEmberClient, EmberAPIError, EmberClient, RetryPolicy
from client_helpers import API_KEY

CHAT = [{"role": "user", "content": "Tell me a story"}]
FAST = RetryPolicy(max_retries=3, base_delay=0.0, max_delay=0.0)


def test_clients_package_imports_nothing_of_ember():
    code = ("import sys, clients; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('engine', 'server', 'training', 'torch', 'ember_cli')]; print(bad); assert not bad")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_sync_client(server):
    with EmberClient(server.url, api_key=API_KEY, model="tiny") as client:
        assert client.health()
        assert [m["id"] for m in client.models()] == ["tiny"]
        plain = client.chat(CHAT, max_tokens=8, temperature=0)
        text = plain["choices"][0]["message"]["content"]
        assert "".join(client.chat_text_stream(CHAT, max_tokens=8, temperature=0)) == text
        chunks = list(client.completions_stream("Once upon", max_tokens=5, temperature=0,
                                                stream_options={"include_usage": True}))
        assert chunks[-1]["usage"]["completion_tokens"] == chunks[-1]["usage"]["total_tokens"] - \
            chunks[-1]["usage"]["prompt_tokens"]
        done = client.completions("Once upon", max_tokens=5, temperature=0)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == done["choices"][0]["text"]
        ids = client.tokenize("hello world")["tokens"]
        assert client.detokenize(ids) == "hello world"
        assert "ember_requests_running" in client.metrics()
        with pytest.raises(EmberAPIError) as exc:
            client.completions("x", max_tokens=10_000)
        assert exc.value.status == 400 and exc.value.param == "max_tokens"
    with EmberClient(server.url, api_key="wrong") as client, pytest.raises(EmberAPIError) as exc:
        client.models()
    assert exc.value.status == 401 and exc.value.code == "invalid_api_key"


def test_async_client(server):
    async def run():
        async with AsyncEmberClient(server.url, api_key=API_KEY) as client:
            assert await client.health()
            plain = await client.chat(CHAT, max_tokens=6, temperature=0)
            pieces = [p async for p in client.chat_text_stream(CHAT, max_tokens=6, temperature=0)]
            both = await asyncio.gather(client.completions("a", max_tokens=3), client.completions("b", max_tokens=3))
            with pytest.raises(EmberAPIError) as exc:
                await client.chat(CHAT, model="nope")
            return plain, pieces, both, exc.value

    plain, pieces, both, err = asyncio.run(run())
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert all(r["usage"]["completion_tokens"] <= 3 for r in both)
    assert err.status == 404 and err.code == "model_not_found"


def scripted(statuses: list[int], calls: list[httpx.Request], retry_after: str | None = "0"):
    """A transport answering with `statuses` in turn (then 200 with a completion body)."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= len(statuses):
            status = statuses[len(calls) - 1]
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return httpx.Response(status, headers=headers,
                                  json={"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                                  "code": "queue_full"}})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "ok"}]})

    return handler


def test_sync_retry_on_429_and_503_then_success():
    calls: list[httpx.Request] = []
    transport = httpx.MockTransport(scripted([429, 503], calls))
    with EmberClient("http://test", retry=FAST, transport=transport) as client:
        assert client.completions("x")["choices"][0]["text"] == "ok"
    assert len(calls) == 3


def test_sync_retry_gives_up_and_does_not_retry_400():
    calls: list[httpx.Request] = []
    with EmberClient("http://test", retry=FAST, transport=httpx.MockTransport(scripted([503] * 9, calls))) as c:
        with pytest.raises(EmberAPIError) as exc:
            c.completions("x")
    assert exc.value.status == 503 and exc.value.retry_after == 0 and len(calls) == 4
    calls.clear()
    with EmberClient("http://test", retry=FAST, transport=httpx.MockTransport(scripted([400], calls))) as c:
        with pytest.raises(EmberAPIError):
            c.completions("x")
    assert len(calls) == 1


def test_retry_delay_honours_retry_after():
    policy = RetryPolicy(max_retries=3, base_delay=0.5, max_delay=10)
    assert policy.delay(0, 3.0) == 3.0
    assert policy.delay(0, 100.0) == 10  # capped
    assert 0.25 <= policy.delay(0, None) <= 0.5 and 1.0 <= policy.delay(2, None) <= 2.0


def test_async_retry_then_stream():
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "full"}})
        body = (b'data: {"choices":[{"index":0,"text":"he"}]}\n\n'
                b'data: {"choices":[{"index":0,"text":"llo","finish_reason":"length"}]}\n\n'
                b"data: [DONE]\n\n")
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def run():
        async with AsyncEmberClient("http://test", retry=FAST, transport=httpx.MockTransport(handler)) as c:
            return [chunk async for chunk in c.completions_stream("x")]

    chunks = asyncio.run(run())
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello" and len(calls) == 2


def test_stream_error_event_raises():
    body = (b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
            b'event: error\ndata: {"error":{"message":"engine step failed","type":"server_error",'
            b'"param":null,"code":"engine_error"}}\n\ndata: [DONE]\n\n')
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    with EmberClient("http://test", transport=transport) as client:
        stream = client.completions_stream("x")
        assert next(stream)["choices"][0]["text"] == "a"
        with pytest.raises(EmberAPIError) as exc:
            next(stream)
    assert exc.value.message == "engine step failed" and exc.value.code == "engine_error"
