"""A validated generation request ready to run: prompts, sampling parameters, ids, bookkeeping.

Both generation endpoints build a Job, admit it, and then either collect its outputs into one
response or stream them; the Job hides the engine, the trackers and the merge of several prompts.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.outputs import RequestOutputAccumulator
from server.admission import Slot
from server.disconnect import run_until_disconnect
from server.errors import APIError, bad_request
from server.generation import EngineRun, start_run
from server.models import Target
from server.protocol.common import UsageInfo
from server.state import ServerState
from server.streaming import EventStreamResponse, sse_events
from server.tracking import GenerationTracker, RequestRecord


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Job:
    """One HTTP generation request: `prompts` (token ids) run with `params` on `target`."""

    state: ServerState
    target: Target
    request_id: str
    prompts: list[list[int]]
    params: Any  # engine SamplingParams
    record: RequestRecord
    priority: int = 0  # engine scheduling priority (lower first)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        return self.target.model

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def cost(self) -> int:
        """Engine sequences this job occupies (each of n choices of each prompt is one)."""
        return len(self.prompts) * self.params.n

    def start(self) -> EngineRun:
        """Hand every prompt to the engine; iterate the result for `(prompt_index, RequestOutput delta)`."""
        trackers = [GenerationTracker(self.state.metrics, self.record, len(p)) for p in self.prompts]
        return start_run(self.state.engine, self.prompts, self.params, self.request_id, trackers,
                         self.target.adapter, self.priority)

    async def collect(self) -> list[Any]:
        """Run to completion; the cumulative RequestOutput of each prompt, in prompt order."""
        accs = [RequestOutputAccumulator() for _ in self.prompts]
        async with aclosing(self.start()) as outs:
            async for i, out in outs:
                accs[i].add(out)
        return [acc.result for acc in accs]

    def usage(self, completion_tokens: int) -> UsageInfo:
        prompt = self.num_prompt_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens,
                         total_tokens=prompt + completion_tokens)

    def admit(self) -> Slot:
        state = self.state
        if self.cost > state.admission.capacity:
            raise bad_request(f"this request needs {self.cost} sequences (prompts x n); the server holds at most "
                              f"{state.admission.capacity} at once", "n")
        return state.admission.admit(self.cost)


def new_record(state: ServerState, request: Request, target: Target, request_id: str, user: str | None) -> RequestRecord:
    """Start the request's log record and hang it on the request for the access-log middleware."""
    record = RequestRecord(request_id=request_id, model=target.model, adapter=target.adapter_label, user=user)
    request.state.record = record
    return record


async def respond(job: Job, request: Request, build: Any, stream: AsyncIterator[dict] | None) -> Any:
    """Admit the job, then stream `stream` as SSE or await `build()` for one JSON body.

    The admission slot is held until the response is finished, however it ends; a client that
    leaves cancels the work (and so the engine requests) at once.
    """
    slot = job.admit()
    if stream is not None:
        metrics = job.state.metrics

        def on_error(err: APIError) -> None:
            metrics.requests_failed.labels(metrics.model, str(err.status)).inc()

        body = sse_events(stream, on_error)

        async def close() -> None:
            await body.aclose()
            slot.release()

        return EventStreamResponse(body, on_close=close)
    try:
        return JSONResponse(await run_until_disconnect(request, build()))
    finally:
        slot.release()
