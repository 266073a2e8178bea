"""The state of one sequence the engine is generating: its tokens, how many are computed, its status.

A user request with n > 1 choices becomes n `Request` objects (one per choice) sharing a group id.
Plain Python, no torch: the scheduler and the block pool work on these.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any, Hashable

from engine.sampling import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self._value_ in _FINISHED  # read several times per request per step (str hash, not Enum's)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = frozenset(s.value for s in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                                         RequestStatus.FINISHED_ABORTED))


def adapter_identity(lora: Any) -> tuple[Hashable, ...] | None:
    """A hashable (name, version) for an adapter reference: None, a str, a tuple, or an object with
    `name` (or `lora_name`) and optionally `version`. It keys the prefix cache, so KV computed under
    one adapter (or one version of it) is never reused under another."""
    if lora is None:
        return None
    if isinstance(lora, str):
        return (lora, None)
    if isinstance(lora, tuple):
        return lora
    name = getattr(lora, "name", None) or getattr(lora, "lora_name", None)
    if name is None:
        raise TypeError(f"cannot identify adapter {lora!r}: give a name (str), a (name, version) tuple, "
                        "or an object with a `name` attribute")
    return (name, getattr(lora, "version", None))


class Request:
    """One sequence: prompt + generated tokens, the computed-token count, status and timestamps.

    The scheduler closes the gap between `num_computed_tokens` and `num_tokens`; a preempted
    request drops back to zero computed tokens but keeps its output, so recomputing it resumes
    exactly where it stopped.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, max_tokens: int,
                 eos_token_ids: frozenset[int] = frozenset(), priority: int = 0, lora: Any = None,
                 group_id: str | None = None, index: int = 0, arrival_time: float | None = None):
        self.request_id = request_id
        self.group_id = group_id if group_id is not None else request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self._num_prompt = len(self.prompt_token_ids)  # the prompt never changes; read many times a step
        self.token_ids = list(prompt_token_ids)  # prompt followed by the output
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.priority = priority
        self.lora = lora
        self.adapter = adapter_identity(lora)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_seq = next(_arrival_counter)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.stop_reason: str | int | None = None
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self._num_prompt:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self._num_prompt

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_seq)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    # -- transitions ----------------------------------------------------------------------------
    def append_token(self, token_id: int, now: float) -> None:
        """Record a sampled token and finish the request if it hits a stop token or its length."""
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        n_out = self.num_output_tokens
        if token_id in self.stop_ids and n_out > self.params.min_tokens:
            self.finish(RequestStatus.FINISHED_STOPPED, now, stop_reason=None if token_id not in
                        self.params.stop_token_ids else token_id)
        elif n_out >= self.max_tokens:
            self.finish(RequestStatus.FINISHED_LENGTH, now)

    def finish(self, status: RequestStatus, now: float | None = None, stop_reason: str | int | None = None) -> None:
        self.status = status
        self.stop_reason = stop_reason
        self.finished_time = time.monotonic() if now is None else now

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.name})")
