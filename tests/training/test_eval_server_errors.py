"""Server-backed scoring against a fake OpenAI-compatible server (httpx.MockTransport): request shape,
score assembly, and clear errors when the server cannot score."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.training.eval_fixtures import FIXTURES
from training.eval import EvalOptions, ServerError, evaluate
from training.eval.items import ScoreRequest
from training.eval.remote import ServerModel

PIQA = str(FIXTURES / "piqa" / "valid.jsonl")


class FakeServer:
    """Answers /tokenize (one id per character, BOS 1), /v1/models and /v1/completions.

    `logprobs` picks the completions behaviour: "echo" (position i of a prompt has logprob -i/100),
    "none" (logprobs null), "generated_only" (only the generated token), "nulls" (prompt entries null).
    """

    def __init__(self, logprobs: str = "echo", refuse_zero: bool = False, tokenize: bool = True):
        self.logprobs, self.refuse_zero, self.tokenize = logprobs, refuse_zero, tokenize
        self.bodies: list[dict] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake", "max_model_len": 4096}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if request.url.path == "/tokenize":
            if not self.tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json={"tokens": [1] + [ord(c) % 500 for c in body["prompt"]]})
        if self.refuse_zero and body["max_tokens"] == 0:
            return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1",
                                                       "type": "invalid_request_error", "param": "max_tokens"}})
        return httpx.Response(200, json={"choices": [self._choice(i, p, body["max_tokens"])
                                                     for i, p in enumerate(body["prompt"])]})

    def _choice(self, index: int, prompt: list[int], max_tokens: int) -> dict:
        n = len(prompt) + max_tokens
        lps = [None] + [-i / 100 for i in range(1, n)]
        top = [None] + [{f"t{i}": -i / 100} for i in range(1, n)]
        if self.logprobs == "none":
            logprobs = None
        elif self.logprobs == "generated_only":
            logprobs = {"tokens": ["x"], "token_logprobs": [-0.5], "top_logprobs": [{"x": -0.5}], "text_offset": [0]}
        elif self.logprobs == "nulls":
            logprobs = {"tokens": ["x"] * n, "token_logprobs": [None] * n, "top_logprobs": [None] * n,
                        "text_offset": [0] * n}
        else:
            logprobs = {"tokens": ["x"] * n, "token_logprobs": lps, "top_logprobs": top, "text_offset": [0] * n}
        return {"index": index, "text": "", "logprobs": logprobs, "finish_reason": "length"}


def _model(fake: FakeServer, **kwargs) -> ServerModel:
    return ServerModel("http://fake/v1", "fake", transport=httpx.MockTransport(fake), **kwargs)


def test_requests_are_token_id_prompts_with_echo_and_scores_sum_the_continuation():
    fake = FakeServer()
    lm = _model(fake, batch_size=2, api_key="sk-test")
    scores = lm.loglikelihoods([ScoreRequest((1, 5, 6), (7, 8)), ScoreRequest((1, 5), (9,)),
                                ScoreRequest((1,), (4, 4, 4))])
    completions = [b for b in fake.bodies if "echo" in b]
    assert [len(b["prompt"]) for b in completions] == [2, 1]  # batched, batch_size prompts per request
    assert completions[0] == {"model": "fake", "prompt": [[1, 5, 6, 7, 8], [1, 5, 9]], "echo": True, "logprobs": 1,
                              "temperature": 0.0, "max_tokens": 0}
    assert [s.logprob for s in scores] == pytest.approx([-(3 + 4) / 100, -2 / 100, -(1 + 2 + 3) / 100])
    assert [s.num_tokens for s in scores] == [2, 1, 3]
    assert all(s.greedy for s in scores)  # each chosen logprob is the top one in the fake answer
    assert fake.headers[0]["authorization"] == "Bearer sk-test"
    assert lm.max_length == 4095


@pytest.mark.parametrize("mode", ["none", "generated_only", "nulls"])
def test_no_prompt_logprobs_is_an_error_not_a_zero_score(mode):
    lm = _model(FakeServer(logprobs=mode))
    with pytest.raises(ServerError, match="the server returned no prompt logprobs"):
        evaluate("piqa", lm, EvalOptions(data=PIQA, progress=False))


def test_a_server_refusing_max_tokens_zero_is_asked_for_one_token():
    fake = FakeServer(refuse_zero=True)
    report = evaluate("piqa", _model(fake, batch_size=2), EvalOptions(data=PIQA, progress=False))
    assert report.metrics[0].n == 4
    sent = [b["max_tokens"] for b in fake.bodies if "echo" in b]
    assert sent[:2] == [0, 1] and set(sent[2:]) == {1}  # asked once, remembered afterwards


def test_http_errors_carry_the_server_message():
    def reject(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "Invalid API key", "type": "authentication_error"}})

    lm = ServerModel("http://fake", "fake", transport=httpx.MockTransport(reject))
    with pytest.raises(ServerError, match=r"/v1/completions: HTTP 401: Invalid API key"):
        lm.loglikelihoods([ScoreRequest((1,), (2,))])


def test_a_server_without_tokenize_asks_for_a_local_tokenizer():
    lm = _model(FakeServer(tokenize=False))
    with pytest.raises(ServerError, match=r"HTTP 404.*give the served model's tokenizer \(--tokenizer DIR\)"):
        evaluate("piqa", lm, EvalOptions(data=PIQA, progress=False))


def test_wrong_number_of_choices_is_an_error():
    def one_choice(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "logprobs": None}]})

    lm = ServerModel("http://fake", "fake", transport=httpx.MockTransport(one_choice))
    with pytest.raises(ServerError, match="expected 2 choices"):
        lm.loglikelihoods([ScoreRequest((1,), (2,)), ScoreRequest((1,), (3,))])
