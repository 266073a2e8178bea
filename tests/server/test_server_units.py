"""Unit tests of the server's parts that need no model: settings, admission, SSE framing, error mapping."""
from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from engine.errors import ContextLengthError, EmberError
from server.admission import Admission
from server.errors import APIError, _param_from_loc, from_engine_error
from server.settings import ServerSettings
from server.streaming import DONE, sse_events


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("EMBER_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("EMBER_API_KEY", "k1, k2")
    monkeypatch.setenv("EMBER_PUBLIC_ROUTES", "/health")
    monkeypatch.setenv("EMBER_DRAIN_TIMEOUT", "2.5")
    s = ServerSettings()
    assert s.max_num_seqs == 7 and s.api_key == ["k1", "k2"] and s.public_routes == ["/health"]
    assert s.drain_timeout == 2.5 and s.host == "127.0.0.1" and s.port == 8000
    assert ServerSettings(max_num_seqs=3).max_num_seqs == 3  # arguments beat the environment


def test_settings_validation():
    with pytest.raises(ValueError):
        ServerSettings(max_num_seqs=0)
    with pytest.raises(ValueError):
        ServerSettings(log_level="loud")
    with pytest.raises(ValueError):
        ServerSettings(max_logprobs=21)


def test_serve_options_map_to_settings(monkeypatch):
    from ember_cli.serve import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.setenv("EMBER_MAX_QUEUE", "5")
    monkeypatch.setenv("EMBER_PORT", "9000")
    args = parser.parse_args(["serve", "--port", "1234", "--api-key", "a", "--api-key", "b", "--max-num-seqs", "3"])
    s = settings_from_args(args)
    assert s.port == 1234 and s.api_key == ["a", "b"] and s.max_num_seqs == 3
    assert s.max_queue == 5  # not given on the command line: the environment fills it


def test_server_cpu_threads_leave_a_core_to_the_event_loop(monkeypatch):
    from server import engine_loader

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engine_loader, "usable_cores", lambda: 8)
    assert engine_loader.cpu_threads(ServerSettings()) == 7
    monkeypatch.setattr(engine_loader, "usable_cores", lambda: 1)
    assert engine_loader.cpu_threads(ServerSettings()) == 1
    assert engine_loader.cpu_threads(ServerSettings(cpu_threads=3)) == 3  # an explicit count wins
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert engine_loader.cpu_threads(ServerSettings()) is None  # the environment's choice is kept
    assert engine_loader.cpu_threads(ServerSettings(cpu_threads=2)) == 2
    monkeypatch.setenv("EMBER_CPU_THREADS", "5")
    assert ServerSettings().cpu_threads == 5
    with pytest.raises(ValueError):
        ServerSettings(cpu_threads=0)


@pytest.mark.parametrize("cpu_max,cores", [("max 100000\n", 4), ("200000 100000\n", 2), ("150000 100000", 2),
                                           ("50000 100000", 1), ("800000 100000", 4), (None, 4), ("garbage", 4)])
def test_usable_cores_follow_a_cgroup_quota(monkeypatch, tmp_path, cpu_max, cores):
    from server import engine_loader

    monkeypatch.setattr(engine_loader.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(engine_loader, "CGROUP_CPU_MAX", path)
    assert engine_loader.usable_cores() == cores


def test_admission_bounds_and_draining():
    rejected = []
    adm = Admission(capacity=3, retry_after=2, on_reject=rejected.append)
    a = adm.admit(2)
    with pytest.raises(APIError) as exc:
        adm.admit(2)
    assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "2"}
    b = adm.admit(1)
    a.release()
    a.release()  # idempotent
    assert adm.in_flight == 1
    adm.start_draining()
    with pytest.raises(APIError) as exc:
        adm.admit(1)
    assert exc.value.status == 503 and exc.value.code == "draining"
    assert rejected == ["queue_full", "draining"]

    async def drain() -> tuple[bool, bool]:
        timed_out = await adm.wait_idle(0.01)
        b.release()
        return timed_out, await adm.wait_idle(1)

    assert asyncio.run(drain()) == (False, True)


def test_param_names_from_validation_locations():
    assert _param_from_loc(("body", "messages", 0, "content")) == "messages[0].content"
    assert _param_from_loc(("body", "prompt", "list[int]", 2)) == "prompt[2]"
    assert _param_from_loc(("body",)) is None


def test_engine_errors_map_to_statuses():
    err = from_engine_error(ContextLengthError("too long", "prompt"))
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "prompt")
    assert from_engine_error(EmberError("boom")).status == 500


def test_stream_errors_become_an_error_event_then_done():
    async def chunks():
        yield {"a": 1}
        raise EmberError("step failed")

    async def collect() -> list[bytes]:
        seen = []
        return [part async for part in sse_events(chunks(), seen.append)], seen

    parts, seen = asyncio.run(collect())
    assert parts[0] == b'data: {"a":1}\n\n'
    event, data = parts[1].decode().split("\n", 1)
    assert event == "event: error"
    body = json.loads(data.removeprefix("data: "))
    assert body["error"]["type"] == "server_error" and "step failed" in body["error"]["message"]
    assert parts[2] == DONE and len(parts) == 3
    assert seen[0].status == 500


def test_default_model_is_the_bundled_one_or_a_cached_tiny_model(tmp_path, monkeypatch):
    from server import engine_loader

    bundled = tmp_path / "models" / "ember-stories"
    monkeypatch.setattr(engine_loader, "BUNDLED_MODEL", bundled)
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    first = engine_loader.default_model_dir()
    assert first == tmp_path / "cache" / engine_loader.TINY_NAME and (first / "config.json").is_file()
    assert engine_loader.default_model_dir() == first  # made once, then reused
    assert not any(p.name.startswith(".tiny-") for p in first.parent.iterdir())  # no half-written leftovers
    bundled.mkdir(parents=True)
    (bundled / "config.json").write_text("{}")
    assert engine_loader.default_model_dir() == bundled
    assert engine_loader.served_name(ServerSettings(), bundled) == "ember-stories"
