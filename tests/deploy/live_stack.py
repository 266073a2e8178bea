"""A real Ember server and a real Prometheus scraping it, both on 127.0.0.1, for the live tests.

The Prometheus config is derived from deploy/prometheus/prometheus.yml: same job and rules, with
the target rewritten to the test server and a 1 s scrape/evaluation interval so the test waits
seconds, not minutes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from deploy_tools import PROMETHEUS_CONFIG, RULES_DIR, free_port

SCRAPE_INTERVAL_S = 1


def wait_for(condition: Callable[[], Any], timeout: float, what: str, alive: Callable[[], bool] = lambda: True,
             log: Path | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds.

    `alive` lets a dead subprocess fail the wait at once, with its log, instead of at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if not alive():
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"process died while waiting for {what}\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.2)  # poll interval, not a synchronisation point


def stop(process: subprocess.Popen, timeout: float = 40) -> int:
    """SIGTERM (the graceful path under test elsewhere), SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


@dataclass
class Server:
    """A running `ember serve`."""

    process: subprocess.Popen
    url: str
    port: int
    log: Path


def start_server(ember: str, model: Path, workdir: Path, api_key: str, extra: list[str]) -> Server:
    """Start `ember serve` on a free loopback port and wait until /health says ready."""
    port = free_port()
    log = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}  # no stray settings
    command = [ember, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--api-key", api_key, *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120, "ember /health",
             alive=lambda: process.poll() is None, log=log)
    return Server(process, url, port, log)


@dataclass
class Prometheus:
    """A running Prometheus and a small client for its HTTP API."""

    process: subprocess.Popen
    url: str
    log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; raises with Prometheus's error text on a bad expression."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error')}")
        return body["data"]["result"]

    def rules(self) -> list[dict]:
        """Every loaded rule with its health and last evaluation."""
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]


def derived_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml with the ember job pointed at `target`, on a 1 s cadence."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["rule_files"] = [str(RULES_DIR / Path(pattern).name) for pattern in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ember"]
    for static in job["static_configs"]:
        static["targets"] = [target]
    config["scrape_configs"] = [job]  # the self-scrape job would point at a port that is not ours
    return config


def start_prometheus(binary: str, target: str, workdir: Path) -> Prometheus:
    """Start Prometheus on a free loopback port with the derived config; wait until it is ready."""
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(derived_config(target)))
    port = free_port()
    log = workdir / "prometheus.log"
    command = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log)
    wait_for(lambda: httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200, 60,
             "Prometheus ready", alive=lambda: process.poll() is None, log=log)
    return prometheus
