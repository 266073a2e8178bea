"""The one error contract: every failure is a 4xx/5xx with {"error": {message, type, param, code}}."""
from __future__ import annotations

import httpx
import pytest

from live_helpers import running_server

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(tiny_model):
    with running_server(tiny_model, max_body_bytes=64 * 1024, max_n=4, max_stop=3) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param, fragment", [
    ({}, "prompt", "required"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "x", "temperature": 3}, "temperature", "2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "x", "n": 0}, "n", "1"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "20"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "0"),
    ({"prompt": [], "max_tokens": 1}, "prompt", ""),
    ({"prompt": "x", "bogus": 1}, "bogus", "Unrecognized request argument"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d"]}, "stop", "at most 3"),
    ({"prompt": "x", "n": 5}, "n", "at most 4"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens", "at most 4096"),
    ({"prompt": "x", "max_tokens": 255}, "max_tokens", "maximum context length is 256"),
    ({"prompt": [1, 2, 512]}, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias", "100"),
    ({"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids", "outside the vocabulary"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens", "max_tokens"),
    ({"prompt": "x", "temperature": float("nan")}, None, ""),
])
def test_completions_bad_requests(http, body, param, fragment):
    err = error_of(http.post("/v1/completions", content=_dumps(body),
                             headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"].split(".")[0] == param  # a dict entry is named too: logit_bias.1
    assert fragment in err["message"]


def _dumps(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()  # allows NaN, which the server must refuse


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"metadata": {"a": "b"}}, "metadata"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
])
def test_chat_unsupported_parameters_are_refused(http, extra, param):
    err = error_of(http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra}), 400)
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert "not supported" in err["message"]


def test_chat_neutral_values_of_unsupported_parameters_pass(http):
    body = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *CHAT],
            "max_tokens": 2, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "store": False, "service_tier": "auto", "modalities": ["text"], "user": "u1"}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_chat_validation_names_nested_parameter(http):
    err = error_of(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert err["param"] == "messages[0].role"
    err = error_of(http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert err["param"] == "messages"
    err = error_of(http.post("/v1/chat/completions", json={"messages": CHAT, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"


def test_prompt_longer_than_context_names_the_limit(http):
    err = error_of(http.post("/v1/completions", json={"prompt": [5] * 300, "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"] and err["param"] == "prompt"
    # Text that cannot fit is refused before tokenization, with the same answer.
    err = error_of(http.post("/v1/completions", json={"prompt": "word " * 10_000}), 400)
    assert err["code"] == "context_length_exceeded" and "256 tokens" in err["message"]
    err = error_of(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * 5000}]}),
                   400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    # A long text that might fit is tokenized and measured exactly.
    err = error_of(http.post("/v1/completions", json={"prompt": "word " * 300}), 400)
    assert err["code"] == "context_length_exceeded" and "your prompt has" in err["message"]


def test_body_errors(http):
    err = error_of(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                   400)
    assert "JSON" in err["message"]
    err = error_of(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413)
    assert "65536" in err["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(70):
            yield b" " * 1024
    err = error_of(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                   413)


def test_unknown_route_and_method(http):
    assert error_of(http.get("/v2/everything"), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_engine_survives_bad_requests(http):
    r = http.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_tokenize_and_detokenize(http):
    ids = http.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    chat_ids = http.post("/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
    assert chat_ids["count"] == len(chat_ids["tokens"]) == len(chat_ids["token_strs"])
    assert error_of(http.post("/tokenize", json={}), 400)["param"] == "prompt"
    assert error_of(http.post("/detokenize", json={"tokens": [99999]}), 400)["param"] == "tokens"
    assert error_of(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)["param"] == "model"


def test_version_and_live(http):
    assert http.get("/version").json()["version"]
    assert http.get("/live").json() == {"status": "ok"}
