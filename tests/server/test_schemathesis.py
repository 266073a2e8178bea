"""Property-based fuzzing of every operation in /openapi.json with schemathesis: valid and invalid
inputs against the live server, zero 5xx. Bounded for CI (few examples, small generation caps).

The schema is built at collection time from an app that is never started (the schema does not
depend on the model); a test checks it is exactly what the live server serves at /openapi.json.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from live_helpers import running_server
from server.app import create_app
from server.settings import ServerSettings

MAX_EXAMPLES = 25
SETTINGS = dict(served_model_name="tiny", max_tokens_cap=8, max_n=2, max_prompts=2, max_queue=64)

schema = schemathesis.openapi.from_dict(create_app(ServerSettings(model="unused", **SETTINGS)).openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=MAX_EXAMPLES, database="none")


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, **SETTINGS) as srv:
        yield srv


def test_schema_is_the_served_one(server):
    assert httpx.get(server.url + "/openapi.json").json() == schema.raw_schema


@schema.parametrize()
def test_no_server_errors(case, server):
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error])
