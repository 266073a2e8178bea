"""SamplingParams: what a request asks of the sampler, validated once when it is built.

Plain Python (no torch), so the scheduler and the server can use it without importing torch;
the batched sampler that applies these settings lives in `engine/sampler.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request sampling settings, named as OpenAI and vLLM users know them.

    temperature 0 means greedy. top_k 0 or -1 turns top-k off. max_tokens None means "up to the
    model's context". logprobs None turns log-probabilities off; k in 0..20 returns the sampled
    token's log-probability plus the k most likely alternatives. prompt_logprobs does the same
    for every prompt token (given its prefix). Log-probabilities are those of the model's raw
    distribution, before temperature, penalties and truncation.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias") from exc
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, what: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {what}, got {getattr(self, name)!r}", name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be a positive integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad("max_tokens", "must be a non-negative integer or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be a non-negative integer (0 or -1 turns it off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if self.logit_bias and any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]", "logit_bias")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", "stop")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None or an integer in 0..{MAX_LOGPROBS}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_truncation(self) -> bool:
        """Whether top-k / top-p change the distribution (min_p is applied separately)."""
        return self.top_k > 0 or self.top_p < 1.0
