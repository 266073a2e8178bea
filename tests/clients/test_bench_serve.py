"""`ember bench serve` against the live server: counts, token totals, latency figures, table and JSON."""
from __future__ import annotations

import asyncio
import json

from clients.bench import BenchConfig, BenchRequest, format_table, run_benchmark
from client_helpers import API_KEY
from ember_cli.main import main


def test_random_prompts_with_poisson_arrivals(server):
    cfg = BenchConfig(base_url=server.url, api_key=API_KEY, num_prompts=6, random_input_len=12,
                      random_output_len=5, request_rate=200.0, max_concurrency=3, seed=1)
    summary = asyncio.run(run_benchmark(cfg))
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 6 * 12  # token-id prompts: exact lengths
    assert summary["total_output_tokens"] == 6 * 5  # ignore_eos: every request runs to its length
    for key in ("ttft", "tpot", "itl", "e2el"):
        figures = summary[key]
        assert figures["mean_ms"] > 0 and figures["median_ms"] > 0 and figures["p99_ms"] >= figures["median_ms"]
    assert summary["e2el"]["mean_ms"] >= summary["ttft"]["mean_ms"]
    assert summary["output_throughput"] > 0 and summary["request_throughput"] > 0
    table = format_table(summary)
    assert "Mean TTFT (ms)" in table and "P99 ITL (ms)" in table and "Output token throughput" in table


def test_cli_with_jsonl_prompts_on_chat(server, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me a story", "max_tokens": 4}) + "\n"
                       + json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY, "--endpoint", "chat",
               "--dataset-path", str(prompts), "--num-prompts", "4", "--random-output-len", "3",
               "--result-json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 4 and summary["total_output_tokens"] == 4 + 3 + 4 + 3
    assert summary["settings"]["endpoint"] == "chat" and "api_key" not in summary["settings"]
    assert "Serving benchmark result" in capsys.readouterr().out


def test_failed_requests_are_counted(server):
    cfg = BenchConfig(base_url=server.url, api_key="wrong", num_prompts=2)
    requests = [BenchRequest(prompt=[5, 6, 7], output_len=2, prompt_len=3)] * 2
    summary = asyncio.run(run_benchmark(cfg, requests=requests))
    assert summary["completed"] == 0 and summary["failed"] == 2 and "401" in summary["errors"][0]
