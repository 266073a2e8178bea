"""Fixtures for server tests: a seeded tiny model (helpers live in live_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

# Re-exported for test files that import them from here; new tests import live_helpers directly.
from live_helpers import API_KEY, engine_idle, running_server, sample, scrape, wait_until  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 2-layer, 64-wide Llama with a 512-token SentencePiece vocabulary."""
    from training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0)
