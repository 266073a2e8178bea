"""SIGTERM on `ember serve` with 20 requests in flight: all complete, new work gets 503, exit code 0."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

TOKENS = 300  # per request; 20 requests at 4 a time keep the server busy well past the checks below


def ember_command() -> list[str]:
    script = Path(sys.executable).with_name("ember")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ember_cli.main"]


@pytest.fixture
def serve(tiny_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    proc = subprocess.Popen(
        [*ember_command(), "serve", "--model", str(tiny_model), "--port", "0", "--max-num-seqs", "4",
         "--max-model-len", "512", "--kv-cache-tokens", "16384", "--drain-timeout", "120"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    url = None
    for line in proc.stderr:  # blocks until the server says where it listens (after warm-up)
        log.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
            break
    assert url, "".join(log)
    # Keep draining stderr so the server never blocks on a full pipe.
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _stream(http: httpx.AsyncClient, i: int, admitted: asyncio.Event) -> dict:
    body = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True, "max_tokens": TOKENS,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    reasons, usage, done = [], None, False
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("role"):
                admitted.set()
            reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
            usage = chunk.get("usage") or usage
    return {"reasons": reasons, "usage": usage, "done": done}


async def _scenario(proc: subprocess.Popen, url: str) -> tuple[list[dict], httpx.Response, float]:
    admitted = [asyncio.Event() for _ in range(20)]
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32)) as http:
        tasks = [asyncio.create_task(_stream(http, i, admitted[i])) for i in range(20)]
        await asyncio.gather(*(e.wait() for e in admitted))
        os.kill(proc.pid, signal.SIGTERM)
        async with httpx.AsyncClient(base_url=url, timeout=30) as fresh:
            deadline = time.monotonic() + 30
            while (await fresh.get("/health")).status_code != 503:  # wait for the signal to be handled
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            refused = await fresh.post("/v1/completions", json={"prompt": "late", "max_tokens": 1})
            live = (await fresh.get("/live")).status_code
        results = await asyncio.gather(*tasks)
    return results, refused, live


def test_sigterm_drains_in_flight_requests_and_exits_zero(serve):
    proc, url, log = serve
    results, refused, live = asyncio.run(_scenario(proc, url))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "draining" and refused.headers["retry-after"]
    assert live == 200
    assert len(results) == 20
    for r in results:
        assert r["done"] and r["reasons"] == ["length"]
        assert r["usage"]["completion_tokens"] == TOKENS
    assert proc.wait(timeout=60) == 0, "".join(log)
    assert re.search(r"draining: \d+ request\(s\) in flight", "".join(log))
