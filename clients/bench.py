"""A serving load generator in the manner of `vllm bench serve`, on httpx alone.

Requests arrive as a Poisson process at `request_rate` per second (all at once when infinite), at
most `max_concurrency` in flight. Prompts are random token ids of random lengths (drawn from the
server's own vocabulary through `/tokenize`, so any tokenizer works) or come from a JSONL file.
Every request streams; per request we record time to first token (TTFT), the gaps between
chunks (ITL), time per output token after the first (TPOT) and end-to-end latency (E2E).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients._common import NO_RETRY
from clients.async_client import AsyncEmberClient

# Tokenized once through the server to learn which token ids exist.
VOCAB_SEED_TEXT = (
    "Once upon a time there was a little girl who lived in a village near the forest. Whenever she went "
    "out, she wore a red riding cloak, so everyone called her Little Red Riding Hood. The quick brown fox "
    "jumps over the lazy dog; 0123456789, and then: why? Because! Numbers, letters, spaces and punctuation."
)


@dataclass
class BenchRequest:
    prompt: Any  # text or token ids
    output_len: int
    prompt_len: int | None = None


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


@dataclass
class BenchConfig:
    """What to run; field names double as the CLI's options."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    random_input_len: int = 128
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    dataset_path: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0


def _lengths(rng: random.Random, mean: int, ratio: float, count: int) -> list[int]:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


async def random_requests(client: AsyncEmberClient, cfg: BenchConfig) -> list[BenchRequest]:
    """Random-length prompts of token ids the server's tokenizer knows."""
    rng = random.Random(cfg.seed)
    vocab = sorted(set((await client.tokenize(VOCAB_SEED_TEXT))["tokens"]))
    ins = _lengths(rng, cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts)
    outs = _lengths(rng, cfg.random_output_len, cfg.random_range_ratio, cfg.num_prompts)
    requests = []
    for n_in, n_out in zip(ins, outs):
        ids = [rng.choice(vocab) for _ in range(n_in)]
        prompt: Any = ids if cfg.endpoint == "completions" else await client.detokenize(ids)
        requests.append(BenchRequest(prompt, n_out, n_in))
    return requests


def jsonl_requests(path: str | Path, cfg: BenchConfig) -> list[BenchRequest]:
    """Prompts from a JSONL file: one object per line with `prompt` and optionally `max_tokens`."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object with a 'prompt'") from None
            requests.append(BenchRequest(prompt, int(row.get("max_tokens") or cfg.random_output_len)))
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return (requests * math.ceil(cfg.num_prompts / len(requests)))[:cfg.num_prompts]


async def _one(client: AsyncEmberClient, cfg: BenchConfig, req: BenchRequest) -> RequestResult:
    params: dict[str, Any] = {"max_tokens": req.output_len, "temperature": cfg.temperature,
                              "ignore_eos": cfg.ignore_eos, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        stream = client.chat_stream([{"role": "user", "content": req.prompt}], **params)
    else:
        stream = client.completions_stream(req.prompt, **params)
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False, prompt_len=req.prompt_len or 0)
    chunks = 0
    try:
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.get("usage"):
                result.prompt_len = chunk["usage"]["prompt_tokens"]
                result.output_len = chunk["usage"]["completion_tokens"]
            if not any(_has_content(c) for c in chunk.get("choices") or []):
                continue
            chunks += 1
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        result.e2e = time.perf_counter() - start
        result.output_len = result.output_len or chunks
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point, not the end of the run
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _has_content(choice: dict) -> bool:
    if "delta" in choice:
        return bool(choice["delta"].get("content"))
    return bool(choice.get("text"))


async def run_benchmark(cfg: BenchConfig, requests: list[BenchRequest] | None = None) -> dict[str, Any]:
    """Send the requests at the configured rate and concurrency; returns the summary dict."""
    async with AsyncEmberClient(cfg.base_url, api_key=cfg.api_key, model=cfg.model, retry=NO_RETRY,
                                max_connections=cfg.max_concurrency) as client:
        if requests is None:
            requests = (jsonl_requests(cfg.dataset_path, cfg) if cfg.dataset_path
                        else await random_requests(client, cfg))
        rng = random.Random(cfg.seed + 1)
        limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(req: BenchRequest) -> RequestResult:
            if limit is None:
                return await _one(client, cfg, req)
            async with limit:
                return await _one(client, cfg, req)

        tasks = []
        start = time.perf_counter()
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(cfg.request_rate) and i < len(requests) - 1:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(cfg, results, duration)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean_ms": 1000 * statistics.fmean(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * p99}


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_len for r in ok)
    settings = asdict(cfg)
    settings["request_rate"] = "inf" if math.isinf(cfg.request_rate) else cfg.request_rate
    settings.pop("api_key", None)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "ttft": _stats([r.ttft for r in ok]),
        "tpot": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": _stats([gap for r in ok for gap in r.itl]),
        "e2el": _stats([r.e2e for r in ok]),
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a short fixed-width table."""
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total generated tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
    ]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        s = summary[key]
        rows += [(f"Mean {name} (ms)", f"{s['mean_ms']:.2f}"), (f"Median {name} (ms)", f"{s['median_ms']:.2f}"),
                 (f"P99 {name} (ms)", f"{s['p99_ms']:.2f}")]
    width = max(len(name) for name, _ in rows) + 2
    line = "=" * (width + 12)
    return "\n".join([line, " Serving benchmark result".ljust(width + 12), line,
                      *(f"{name:<{width}}{value:>12}" for name, value in rows), line])
