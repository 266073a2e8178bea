"""What the engine hands back each step: per-request deltas with text, token ids, logprobs and timings.

Outputs are deltas: `CompletionOutput.text`, `token_ids` and `logprobs` hold only what is new since
the previous output of that request. `RequestOutputAccumulator` folds deltas into cumulative
outputs for offline use.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token with its log-probability under the model's raw distribution."""

    token_id: int
    logprob: float
    token: str  # the decoded piece


@dataclass
class TokenLogprobs:
    """The chosen (generated or prompt) token at one position and the most likely alternatives."""

    token: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One choice's news since its previous output (deltas), plus its cumulative token count."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic()) and token counts of one request, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """A step's news for one request: the choices that changed, and whether all n are done."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


class RequestOutputAccumulator:
    """Folds a request's delta outputs into one cumulative RequestOutput (all choices, by index)."""

    def __init__(self) -> None:
        self.result: RequestOutput | None = None
        self._choices: dict[int, CompletionOutput] = {}

    def add(self, delta: RequestOutput) -> RequestOutput:
        if self.result is None:
            self.result = dataclasses.replace(delta, outputs=[])
        self.result.finished = delta.finished
        self.result.metrics = delta.metrics
        if delta.prompt_logprobs is not None:
            self.result.prompt_logprobs = delta.prompt_logprobs
        for out in delta.outputs:
            acc = self._choices.get(out.index)
            if acc is None:
                self._choices[out.index] = dataclasses.replace(
                    out, token_ids=list(out.token_ids), logprobs=None if out.logprobs is None else list(out.logprobs))
                continue
            acc.text += out.text
            acc.token_ids.extend(out.token_ids)
            if out.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + list(out.logprobs)
            acc.finish_reason, acc.stop_reason, acc.num_tokens = out.finish_reason, out.stop_reason, out.num_tokens
        self.result.outputs = [self._choices[i] for i in sorted(self._choices)]
        return self.result
