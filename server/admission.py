"""Admission control: a bounded number of requests in the engine, and the draining switch.

The engine runs `max_num_seqs` requests at once; up to `max_queue` more may wait. Past that a
request is refused at once with 429 and Retry-After instead of piling up. Once draining starts
(SIGTERM) every new request gets 503 while those already admitted run to completion.

Admission is decided here, synchronously on the event loop, before anything reaches the engine,
so the limit is exact: no race between concurrent arrivals.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from server.errors import APIError


class Slot:
    """`k` admitted engine requests; `release()` gives them back exactly once."""

    def __init__(self, admission: "Admission", k: int):
        self._admission = admission
        self.k = k

    def release(self) -> None:
        if self.k:
            self._admission._release(self.k)
            self.k = 0


class Admission:
    """Counts admitted engine requests against `capacity`; knows whether the server is draining."""

    def __init__(self, capacity: int, retry_after: int,
                 on_reject: Callable[[str], None] | None = None):
        self.capacity = capacity
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self._on_reject = on_reject or (lambda reason: None)
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, k: int = 1) -> Slot:
        """Admit `k` engine requests (one per prompt) or raise 503 (draining) / 429 (queue full)."""
        if self.draining:
            self._on_reject("draining")
            raise APIError(503, "the server is shutting down and accepts no new requests",
                           type="service_unavailable", code="draining", headers=self._headers())
        if self.in_flight + k > self.capacity:
            self._on_reject("queue_full")
            raise APIError(429, f"the server is at capacity ({self.capacity} requests running or queued); "
                                f"retry after {self.retry_after} s",
                           type="rate_limit_error", code="queue_full", headers=self._headers())
        self.in_flight += k
        self._idle.clear()
        return Slot(self, k)

    def _release(self, k: int) -> None:
        self.in_flight -= k
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    def _headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no admitted request is left; False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
