"""A real Prometheus scrapes a real Ember server; every dashboard and alert query returns data.

Starts `ember serve` on a tiny model and Prometheus (Debian's package) on 127.0.0.1, sends traffic
(a LoRA adapter trained by `ember finetune`, loaded at run time and used; plain, streaming and chat
completions; a client that leaves mid-stream; bad requests), waits
until Prometheus has scraped after the traffic and evaluated the rules, then sends every PromQL
expression of the Grafana dashboard and of the alert rules to Prometheus's query API.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy_tools import DEPLOY, dashboard_files, need_binary, rule_files
from live_stack import SCRAPE_INTERVAL_S, start_prometheus, start_server, stop, wait_for
from promql_exprs import EXPOSED_NAMES, condition_operands, dashboard_queries, rule_expressions, substitute

pytestmark = pytest.mark.timeout(240)

API_KEY = "live-test-key"
MODEL_NAME = "tiny-live"
ADAPTER = "story-lora"
# Long enough to span pre- and post-traffic samples at a 1 s scrape interval.
RATE_WINDOW = "1m"


def _ember() -> str:
    ember = str(Path(sys.executable).parent / "ember")
    if not os.path.exists(ember):
        pytest.skip("the ember command is not installed in this environment")
    probe = subprocess.run([ember, "serve", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"`ember serve` is not available yet: {(probe.stderr or probe.stdout).strip()[-200:]}")
    return ember


def _train_adapter(ember: str, base: Path, lora_root: Path) -> None:
    """A LoRA adapter for the tiny base, the way the compose finetune job makes one (one step)."""
    result = subprocess.run([ember, "finetune", "--base", str(base), "--data",
                             str(DEPLOY / "data" / "sample-instructions.jsonl"), "--method", "lora",
                             "--out", str(lora_root / ADAPTER), "lora.r=8", "train.max_steps=1",
                             "schedule.warmup_steps=0"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _send_traffic(url: str) -> dict[str, int]:
    """A little of everything the dashboard shows; returns how many requests of each kind."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    done = {"ok": 0}
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        # An adapter loaded at run time from the LoRA root, then used by one request.
        r = client.post("/v1/load_lora_adapter", json={"lora_name": ADAPTER, "lora_path": ADAPTER})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": ADAPTER, "prompt": "Once upon a time", "max_tokens": 8})
        assert r.status_code == 200, r.text
        done["ok"] += 1
        for prompt in ("Once upon a time", "The little dog", "Once upon a time there was"):
            r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            done["ok"] += 1
        with client.stream("POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "A cat", "max_tokens": 12,
                                                             "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            done["ok"] += 1
        r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "Tell me a story."}]})
        assert r.status_code == 200, r.text
        done["ok"] += 1
        # A client that leaves after the first chunk: counted as aborted.
        with client.stream("POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "Far away", "max_tokens": 500,
                                                             "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        # Errors: a bad parameter (400), an unknown model (404), a missing key (401, rejected).
        assert client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1}).status_code == 400
        assert client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}, timeout=30).status_code == 401
    return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server + Prometheus, traffic sent, a scrape and a rule evaluation after the traffic done."""
    ember = _ember()
    prometheus_bin = need_binary("prometheus", "the Debian package prometheus")
    workdir = tmp_path_factory.mktemp("live")
    model = workdir / "model"
    subprocess.run([ember, "new-tiny", "--out", str(model)], check=True, capture_output=True, timeout=120)
    lora_root = workdir / "adapters"
    _train_adapter(ember, model, lora_root)
    server = start_server(ember, model, workdir, API_KEY, ["--served-model-name", MODEL_NAME, "--max-num-seqs", "4",
                                                           "--enable-lora", "--lora-root", str(lora_root)])
    prometheus = None
    try:
        prometheus = start_prometheus(prometheus_bin, f"127.0.0.1:{server.port}", workdir)
        # A pre-traffic sample, so rates over the window see the traffic as an increase.
        wait_for(lambda: [s for s in prometheus.query('up{job="ember"}') if s["value"][1] == "1"], 60,
                 "the first successful scrape", log=prometheus.log)
        sent = _send_traffic(server.url)
        traffic_done = time.time()
        wait_for(lambda: [s for s in prometheus.query('timestamp(up{job="ember"})')
                          if float(s["value"][1]) > traffic_done + SCRAPE_INTERVAL_S], 60,
                 "a scrape after the traffic", log=prometheus.log)

        def rules_evaluated() -> bool:
            rules = prometheus.rules()
            return bool(rules) and all(r["health"] == "ok"
                                       and _rfc3339(r["lastEvaluation"]) > traffic_done + SCRAPE_INTERVAL_S
                                       for r in rules)

        wait_for(rules_evaluated, 60, "every rule evaluated after the traffic", log=prometheus.log)
        yield {"server": server, "prometheus": prometheus, "sent": sent}
    finally:
        if prometheus is not None:
            stop(prometheus.process)
        exit_code = stop(server.process)
        assert exit_code == 0, f"ember serve exited {exit_code} on SIGTERM\n{server.log.read_text()[-3000:]}"


def _rfc3339(text: str) -> float:
    """Prometheus timestamps (2026-11-28T14:43:33.123456789Z) as Unix seconds."""
    from datetime import datetime

    head, _, frac = text.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float("0." + frac[:6]) if frac else 0.0)


def test_server_exposes_every_metric_the_deployment_uses(stack) -> None:
    server = stack["server"]
    # /metrics, /health and /live need no API key: scrapers and probes carry none.
    for path in ("/metrics", "/health", "/live"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200, path
    exposition = httpx.get(f"{server.url}/metrics", timeout=10).text
    exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line.startswith("ember_")}
    assert EXPOSED_NAMES <= exposed, sorted(EXPOSED_NAMES - exposed)


def test_container_healthcheck_passes_against_the_server(stack) -> None:
    env = {**os.environ, "EMBER_HOST": "0.0.0.0", "EMBER_PORT": str(stack["server"].port)}
    result = subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_dashboard_query_returns_data(stack) -> None:
    prometheus = stack["prometheus"]
    empty = []
    checked = 0
    for path in dashboard_files():
        for where, expr in dashboard_queries(path):
            query = substitute(expr, rate_window=RATE_WINDOW)
            if not prometheus.query(query):
                empty.append(f"{path.name} {where}: {query}")
            checked += 1
    assert checked >= 40
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_alert_condition_has_data(stack) -> None:
    prometheus = stack["prometheus"]
    empty = []
    for path in rule_files():
        for name, expr, is_alert in rule_expressions(path):
            for operand in condition_operands(expr) if is_alert else [expr]:
                if not prometheus.query(operand):
                    empty.append(f"{path.name} {name}: {operand}")
    assert not empty, "rule operands without data:\n" + "\n".join(empty)


def test_rules_are_healthy_and_a_live_instance_raises_no_down_alert(stack) -> None:
    prometheus = stack["prometheus"]
    rules = prometheus.rules()
    assert {r["name"] for r in rules} == {name for p in rule_files() for name, _, _ in rule_expressions(p)}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    down = next(r for r in rules if r["name"] == "EmberInstanceDown")
    assert down["state"] == "inactive"


def test_scraped_values_reflect_the_traffic(stack) -> None:
    prometheus = stack["prometheus"]

    def total(expr: str) -> float:
        return sum(float(s["value"][1]) for s in prometheus.query(expr))

    model = f'model="{MODEL_NAME}"'
    finished = total(f'sum(ember_request_success_total{{{model}, finish_reason=~"stop|length"}})')
    assert finished >= stack["sent"]["ok"]
    assert total(f"sum(rate(ember_generation_tokens_total{{{model}}}[{RATE_WINDOW}]))") > 0
    assert total(f'sum(ember_requests_failed_total{{{model}, status="400"}})') >= 1
    assert total(f'sum(ember_requests_rejected_total{{{model}, reason="auth"}})') >= 1
    assert total(f'sum(ember_http_requests_total{{route="/v1/completions", status="200"}})') >= 4
    ttft_count = total(f'sum(ember_time_to_first_token_seconds_count{{{model}}})')
    assert ttft_count >= stack["sent"]["ok"]
    # Per-adapter traffic and the adapter gauges and histogram.
    by_adapter = {s["metric"]["adapter"]: float(s["value"][1]) for s in prometheus.query(
        f'sum by (adapter) (ember_request_success_total{{{model}, finish_reason=~"stop|length"}})')}
    assert by_adapter.get(ADAPTER, 0) >= 1 and by_adapter.get("base", 0) >= stack["sent"]["ok"] - 1
    assert total(f"ember_lora_adapters_resident{{{model}}}") >= 1
    assert total(f"ember_lora_load_seconds_count{{{model}}}") >= 1


def test_panel_renderer_draws_live_data(stack, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "panel.png"
    result = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "render_panel.py"), "--prometheus",
                             stack["prometheus"].url, "--panel", "Tokens/s in and out", "--minutes", "2",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 series" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
