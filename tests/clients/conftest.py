"""Fixtures for client tests: one live Ember server on loopback (tiny seeded model) per module."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import ServerSettings
from server.testing import serving

from client_helpers import API_KEY


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def server(tiny_model):
    settings = ServerSettings(model=str(tiny_model), served_model_name="tiny", max_model_len=256,
                              kv_cache_tokens=8192, max_num_seqs=8, api_key=[API_KEY])
    with serving(settings) as srv:
        yield srv
