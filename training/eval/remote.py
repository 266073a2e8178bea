"""Server-backed scoring through any OpenAI-compatible `/v1/completions` that echoes prompt logprobs.

Requests go as token-id prompts (context ids + continuation ids, made by the same rule as in
process), several prompts per HTTP request, with `echo=true`, `logprobs=1` and `max_tokens=0`
(1 when a server refuses 0; the generated token is ignored). A continuation's score is the sum of
the echoed `token_logprobs` over its positions. A server that echoes no prompt logprobs is an
error, never a zero score. Text is tokenized with a local tokenizer when one is given, else by
the server's `/tokenize` (vLLM's shape, which Ember serves too).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import httpx

from training.eval.errors import ServerError
from training.eval.items import ContinuationScore, ScoreRequest

Progress = Callable[[int], Any] | None

NO_PROMPT_LOGPROBS = ("the server returned no prompt logprobs for an echo=true, logprobs=1 completion; scoring "
                      "needs a server that echoes the log-probabilities of the prompt tokens (Ember, vLLM)")


class ServerModel:
    """A model behind an OpenAI-compatible server, named as the server serves it (`served_model`)."""

    def __init__(self, base_url: str, served_model: str, api_key: str | None = None, tokenizer: Any = None,
                 batch_size: int = 16, max_length: int | None = None, timeout: float = 600.0,
                 transport: httpx.BaseTransport | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.client = httpx.Client(base_url=root, headers=headers, timeout=timeout, transport=transport)
        self.name = served_model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._max_length = max_length
        self._max_tokens = 0

    def close(self) -> None:
        self.client.close()

    # -- HTTP --------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        try:
            resp = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.client.base_url}{path}: request failed: {exc}") from exc
        if resp.status_code >= 400:
            raise ServerError(f"{self.client.base_url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
        try:
            data = resp.json()
        except ValueError:
            raise ServerError(f"{self.client.base_url}{path}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise ServerError(f"{self.client.base_url}{path}: expected a JSON object")
        return data

    def _completions(self, body: dict) -> dict:
        try:
            return self._post("/v1/completions", {**body, "max_tokens": self._max_tokens})
        except ServerError as exc:
            if self._max_tokens != 0 or "max_tokens" not in str(exc):
                raise
        self._max_tokens = 1  # this server wants at least one generated token; it is ignored
        return self._post("/v1/completions", {**body, "max_tokens": 1})

    # -- the backend interface ---------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        return {"server": self.base_url, "batch_size": self.batch_size,
                "tokenizer": "local" if self.tokenizer is not None else "server /tokenize"}

    @property
    def max_length(self) -> int | None:
        """Longest prompt the server accepts (its context minus one), or None when it does not say."""
        if self._max_length is None:
            try:
                models = self.client.get("/v1/models").json().get("data", [])
            except (httpx.HTTPError, ValueError, AttributeError):
                models = []
            card = next((m for m in models if isinstance(m, dict) and m.get("id") == self.name), {})
            if isinstance(card.get("max_model_len"), int):
                self._max_length = card["max_model_len"] - 1
        return self._max_length

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the served model's tokenizer (BOS as it adds one)."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        try:
            data = self._post("/tokenize", {"model": self.name, "prompt": text, "add_special_tokens": True})
        except ServerError as exc:
            raise ServerError(f"{exc}; the server cannot tokenize, so give the served model's tokenizer "
                              "(--tokenizer DIR)") from None
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerError(f"{self.client.base_url}/tokenize: no 'tokens' list in the answer")
        return tokens

    def loglikelihoods(self, requests: Sequence[ScoreRequest], progress: Progress = None) -> list[ContinuationScore]:
        """Score every request; results in input order."""
        out: list[ContinuationScore] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            body = {"model": self.name, "prompt": [list(r.context + r.continuation) for r in chunk],
                    "echo": True, "logprobs": 1, "temperature": 0.0}
            choices = _choices(self._completions(body), len(chunk))
            out += [_score(choice, req) for choice, req in zip(choices, chunk)]
            if progress:
                progress(len(chunk))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, stop: Sequence[str],
                 progress: Progress = None) -> list[str]:
        """Greedy completions of token-id prompts (as many per request as the batch size)."""
        texts: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = [list(p) for p in prompts[i:i + self.batch_size]]
            body = {"model": self.name, "prompt": chunk, "max_tokens": max_tokens, "temperature": 0.0}
            if stop:
                body["stop"] = list(stop)
            choices = _choices(self._post("/v1/completions", body), len(chunk))
            texts += [c.get("text") or "" for c in choices]
            if progress:
                progress(len(chunk))
        return texts


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return str(body)[:300]


def _choices(data: dict, expected: int) -> list[dict]:
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != expected:
        got = len(choices) if isinstance(choices, list) else "no"
        raise ServerError(f"expected {expected} choices (one per prompt), the server returned {got}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def _score(choice: dict, req: ScoreRequest) -> ContinuationScore:
    logprobs = choice.get("logprobs")
    token_lps = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not token_lps:
        raise ServerError(NO_PROMPT_LOGPROBS)
    end = len(req.context) + len(req.continuation)
    if len(token_lps) < end:
        raise ServerError(f"{NO_PROMPT_LOGPROBS} (got {len(token_lps)} token logprobs for a {end}-token prompt)")
    values = token_lps[len(req.context):end]
    if any(not isinstance(v, (int, float)) for v in values):
        raise ServerError(f"{NO_PROMPT_LOGPROBS} (a continuation position has no logprob)")
    top = logprobs.get("top_logprobs") or []
    greedy = len(top) >= end
    for pos in range(len(req.context), end):
        alts = top[pos] if greedy else None
        if not isinstance(alts, dict) or not alts or token_lps[pos] < max(alts.values()):
            greedy = False
            break
    return ContinuationScore(float(sum(values)), greedy, len(values))
