"""Adapters over HTTP: listing and selection, bad adapters refused in the OpenAI error shape, and
load / use / reload / unload cycles while traffic flows (no failed request, no version mixing,
memory freed)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from live_helpers import API_KEY, running_server, sample, scrape
from engine.adapter_io import load_adapter
from engine.adapter_testing import write_random_adapter
from engine.checkpoint import load_model, save_model
from engine.generate import generate_reference
from engine.lora import merge_adapters
from engine.tokenizer import Tokenizer
from server.lora import OTHER, AdapterLabels

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12]
N_TOKENS = 8
B_TOKENS = 24  # streamed requests, long enough to still run when the unload arrives


@pytest.fixture(scope="module")
def peaked_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with weights scaled up: peaked logits, so greedy outputs have no near-ties."""
    model, config = load_model(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return save_model(model, config, tmp_path_factory.mktemp("peaked") / "tiny", tokenizer_dir=tiny_model)


@pytest.fixture(scope="module")
def lora_root(peaked_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    model, _ = load_model(peaked_model)
    write_random_adapter(model, root / "a1", r=8, seed=1, strength=2.0)
    write_random_adapter(model, root / "a2", r=8, seed=2, strength=2.0)
    write_random_adapter(model, root / "b", r=4, targets=("q_proj", "v_proj", "down_proj"), seed=3, strength=2.0)
    write_random_adapter(model, root / "d", r=8, use_dora=True, seed=4, strength=2.0)
    return root


@pytest.fixture(scope="module")
def server(peaked_model, lora_root):
    with running_server(peaked_model, api_key=[API_KEY], enable_lora=True, lora_root=str(lora_root),
                        lora=["a=a1"], max_loras=2, max_lora_rank=8, max_num_seqs=6) as srv:
        yield srv


def registry(srv):
    return srv.app.state.ember.engine.engine.adapters


def complete(client, model: str, status: int = 200, max_tokens: int = N_TOKENS) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    return r.json()["choices"][0]["text"] if status == 200 else r.json()


def assert_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]


def test_adapters_listed_selected_and_counted(server, peaked_model, lora_root):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["a"]["parent"] == "tiny" and cards["tiny"]["parent"] is None
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "d"})
        assert r.status_code == 200 and r.json()["status"] == "loaded" and r.json()["use_dora"] is True
        assert client.get("/v1/models/d").json()["parent"] == "tiny"

        texts = {name: complete(client, name) for name in ("tiny", "a", "d")}
        tok = Tokenizer.from_dir(peaked_model)
        base, _ = load_model(peaked_model)
        for name, folder in (("a", "a1"), ("d", "d")):
            model, _ = load_model(peaked_model)
            load_adapter(model, lora_root / folder)
            ids = generate_reference(merge_adapters(model).eval(), PROMPT, N_TOKENS, ignore_eos=True)
            assert texts[name] == tok.decode(ids), name
        assert texts["tiny"] == tok.decode(generate_reference(base.eval(), PROMPT, N_TOKENS, ignore_eos=True))
        assert len(set(texts.values())) == 3

        chat = client.post("/v1/chat/completions", json={"model": "a", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["model"] == "a"
        assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "nope")
        assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404, "not loaded")
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "d"}).json()["status"] == "unloaded"
        assert "d" not in {c["id"] for c in client.get("/v1/models").json()["data"]}

    anonymous = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "b"})
    assert anonymous.status_code == 401 and not registry(server).has("z")
    samples = scrape(server.url)
    assert sample(samples, "ember_generation_tokens_total", model="tiny", adapter="a") >= N_TOKENS
    assert sample(samples, "ember_time_to_first_token_seconds_count", model="tiny", adapter="d") >= 1
    assert sample(samples, "ember_lora_adapters_resident", model="tiny") == 1
    assert sample(samples, "ember_lora_load_seconds_count", model="tiny") >= 1


BAD = {  # case -> (lora_path, status, what the message must say)
    "dotdot": ("a1/../a1", 400, "'..'"),
    "absolute": (None, 400, "absolute path outside"),
    "symlink": ("bad-symlink", 400, "symlink"),
    "missing": ("no-such-adapter", 404, "does not exist"),
    "corrupt": ("bad-corrupt", 400, "not a readable safetensors"),
    "pickle": ("bad-pickle", 400, "never unpickles"),
    "rank": ("bad-rank", 400, "max_lora_rank 8"),
    "target": ("bad-target", 400, "does not adapt"),
}


def make_bad(case: str, root: Path, outside: Path, model) -> None:
    bad = root / f"bad-{case}"
    if bad.exists() or bad.is_symlink() or case in ("dotdot", "absolute", "missing"):
        return
    if case == "symlink":
        bad.symlink_to(outside)
    elif case == "rank":
        write_random_adapter(model, bad, r=16)
    elif case == "target":
        write_random_adapter(model, bad, targets=("lm_head",))
    else:
        write_random_adapter(model, bad)
        weights = bad / "adapter_model.safetensors"
        if case == "corrupt":
            weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
        else:
            weights.rename(bad / "adapter_model.bin")


def test_bad_adapters_are_refused_and_the_server_keeps_serving(server, lora_root, peaked_model, tmp_path):
    model, _ = load_model(peaked_model)
    outside = write_random_adapter(model, tmp_path / "outside")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        before = client.get("/v1/models").json()
        held = registry(server).host_bytes()
        for case, (path, status, needle) in BAD.items():
            make_bad(case, lora_root, outside, model)
            body = {"lora_name": f"bad-{case}", "lora_path": path or str(outside)}
            assert_error(client.post("/v1/load_lora_adapter", json=body), status, needle)
        assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": "b"}), 400,
                     "base model")
        assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x y", "lora_path": "b"}), 400,
                     "not a valid adapter name")
        assert client.get("/v1/models").json() == before
        assert registry(server).host_bytes() == held
        complete(client, "tiny")
        complete(client, "a")


async def _traffic(client: httpx.AsyncClient, model: str, rounds: int, results: list) -> None:
    for _ in range(rounds):
        r = await client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": N_TOKENS,
                                                        "temperature": 0, "ignore_eos": True})
        results.append((model, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))


async def _streamed(client: httpx.AsyncClient, model: str, started: asyncio.Event, results: list) -> None:
    """A streaming request that sets `started` once its first token arrived (it then holds its adapter)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": B_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
                started.set()
        results.append((model, r.status_code, "".join(text)))


async def _cycles(client: httpx.AsyncClient, srv, rounds: int, b_results: list) -> None:
    for i in range(rounds):
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": f"a{1 + i % 2}"})
        assert r.status_code == 200 and r.json()["status"] == "reloaded", r.text
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"})
        assert r.status_code == 200, r.text
        started = [asyncio.Event() for _ in range(3)]
        users = [asyncio.create_task(_streamed(client, "b", event, b_results)) for event in started]
        for event in started:  # every b request is generating: the unload has to wait for them
            await event.wait()
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
        assert r.status_code == 200 and r.json()["status"] == "unloaded", r.text
        assert registry(srv).host_bytes("b") == 0, "b's memory is still held after its unload returned"
        await asyncio.gather(*users)


def test_load_use_reload_unload_under_traffic(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        expected = {"base": {complete(client, "tiny")}}
        for folder in ("a1", "a2"):
            assert client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": folder}).status_code == 200
            expected.setdefault("a", set()).add(complete(client, "a"))
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"}).status_code == 200
        expected["b"] = {complete(client, "b", max_tokens=B_TOKENS)}
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    assert len(expected["a"]) == 2 and len(set.union(*expected.values())) == 4

    async def scenario():
        results, b_results = [], []
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            workers = [_traffic(client, model, 6, results) for model in ("a", "a", "tiny", "a")]
            await asyncio.gather(_cycles(client, server, 4, b_results), *workers)
        return results, b_results

    results, b_results = asyncio.run(scenario())
    assert len(results) == 24 and len(b_results) == 12
    for model, status, text in results + b_results:
        assert status == 200, f"{model}: {text}"
        # One request, one version: its text is exactly what one version alone produces.
        assert text in expected["base" if model == "tiny" else model], f"{model}: mixed or wrong output {text!r}"
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
        assert registry(server).host_bytes() == 0
        assert registry(server).stats()["lora_adapters_on_device"] == 0
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a1"})  # back for others
        assert r.status_code == 200


def test_adapter_labels_are_bounded():
    created = []
    labels = AdapterLabels(2, on_new=created.append)
    assert [labels.label(n) for n in ("x", "y", "z", "x", "w")] == ["x", "y", OTHER, "x", OTHER]
    assert created == ["x", "y", OTHER]
