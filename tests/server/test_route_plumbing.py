"""Route plumbing: prompts are tokenized off the event loop; the `priority` extra reaches the engine."""
from __future__ import annotations

import asyncio

import httpx

from live_helpers import running_server


def test_prompts_are_tokenized_off_the_event_loop(tiny_model):
    with running_server(tiny_model) as srv:
        tok = srv.app.state.ember.tokenizer
        on_loop: list[bool] = []
        real_encode, real_template = tok.encode, tok.apply_chat_template

        def loop_running() -> bool:
            try:
                asyncio.get_running_loop()
                return True
            except RuntimeError:
                return False

        def encode(*args, **kwargs):
            on_loop.append(loop_running())
            return real_encode(*args, **kwargs)

        def template(*args, **kwargs):
            on_loop.append(loop_running())
            return real_template(*args, **kwargs)

        tok.encode, tok.apply_chat_template = encode, template
        try:
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "once upon a time", "max_tokens": 2})
            assert r.status_code == 200, r.text
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            bad = httpx.post(srv.url + "/v1/completions", timeout=60,
                             json={"model": "tiny", "prompt": "x", "max_tokens": 10**9})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"  # errors still map
        finally:
            tok.encode, tok.apply_chat_template = real_encode, real_template
        assert len(on_loop) >= 3 and not any(on_loop), on_loop


def test_priority_reaches_the_engine_and_is_validated(tiny_model):
    with running_server(tiny_model) as srv:
        engine = srv.app.state.ember.engine
        seen: list[int] = []
        real_generate = engine.generate

        def generate(*args, priority=0, **kwargs):
            seen.append(priority)
            return real_generate(*args, priority=priority, **kwargs)

        engine.generate = generate
        try:
            for path, body in [("/v1/completions", {"prompt": "once", "priority": -3}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "priority": 7}),
                               ("/v1/completions", {"prompt": "once"})]:
                r = httpx.post(srv.url + path, timeout=60, json={"model": "tiny", "max_tokens": 2, **body})
                assert r.status_code == 200, r.text
            bad = httpx.post(srv.url + "/v1/completions", timeout=60,
                             json={"model": "tiny", "prompt": "x", "priority": 2**40})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
        finally:
            engine.generate = real_generate
        assert seen == [-3, 7, 0]
