"""The official openai SDK, unchanged, against a real Ember server on loopback."""
from __future__ import annotations

import httpx
import openai
import pytest

from live_helpers import API_KEY, running_server

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, api_key=[API_KEY]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _tokens(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_completion_plain(client, server):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(_tokens(server, prompt=PROMPT))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_completion_stream_joins_to_plain_text(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_logprobs_and_echo(client, server):
    n_prompt = len(_tokens(server, prompt=PROMPT))
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0.0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs[1:])
    # Greedy: every generated token is the most likely one.
    for token, value, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert value == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_token_prompts_and_n(client):
    out = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2, temperature=1.0,
                                    seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 12


def test_completion_seed_reproducible_and_stop_string(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    a = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == a
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    if not stop.strip():
        pytest.skip("the greedy continuation has no usable stop string")
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == greedy[:greedy.index(stop)]


def test_chat_plain(client, server):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.usage.completion_tokens <= 6
    assert out.usage.prompt_tokens == len(_tokens(server, messages=CHAT))


def test_chat_stream_include_usage(client):
    kwargs = dict(model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_chat_n2_and_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=7,
                                         logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 4
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


def test_chat_stream_n2_role_first_finish_once(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, n=2, stream=True,
                                                 temperature=1.0, seed=5))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert sum(1 for c in mine if c.finish_reason) == 1 and mine[-1].finish_reason


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert "The model 'gpt-9' does not exist" in exc.value.message
    assert exc.value.body["param"] == "model" and exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_bad_request_names_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert exc.value.body["param"] == "max_tokens" and "at most 4096" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=250)
    assert exc.value.body["code"] == "context_length_exceeded" and "256" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=CHAT,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert exc.value.body["param"] == "tools" and "not supported" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_object"})
    assert exc.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", extra_body={"frobnicate": 1})
    assert exc.value.body["param"] == "frobnicate"


def test_authentication_error(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.body["code"] == "invalid_api_key" and "API key" in exc.value.message
    assert httpx.get(server.url + "/health").status_code == 200  # probes stay public
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_streamed_logprobs_match_non_streamed(client):
    chat = dict(model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [t for c in client.chat.completions.create(**chat, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in plain]

    comp = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**comp).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(**comp, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
