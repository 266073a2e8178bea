"""deploy/docker/healthcheck.py, the image's HEALTHCHECK, against real HTTP servers on loopback."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from deploy_tools import DEPLOY, free_port

SCRIPT = DEPLOY / "docker" / "healthcheck.py"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    handler = type("Handler", (_Health,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def _probe(port: int, host: str = "0.0.0.0") -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBER_PORT": str(port), "EMBER_HOST": host}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_healthy_server_passes(health_server) -> None:
    server, handler = health_server
    result = _probe(server.server_address[1])
    assert result.returncode == 0, result.stderr
    assert handler.paths == ["/health"]


def test_draining_server_fails(health_server) -> None:
    server, handler = health_server
    handler.status = 503
    result = _probe(server.server_address[1], host="127.0.0.1")
    assert result.returncode == 1
    assert "503" in result.stderr


def test_nothing_listening_fails() -> None:
    result = _probe(free_port())
    assert result.returncode == 1
    assert "/health" in result.stderr
