"""Overlapped decode: launch decode step n+1 before reading step n's sampled tokens.

In a pure decode step the GPU would sit idle while the host waits for the sampled tokens, updates
the scheduler, builds the outputs, then schedules, prepares and launches the next step. When the
next step is predictable, `Engine.step()` launches it first: the same sequences one position on,
their input ids taken from step n's sampled-token tensor on the device (no host round trip), then
it reads step n's tokens and does step n's bookkeeping while step n+1 runs. The next call completes
step n+1 and may launch step n+2 the same way. Outputs are those of the synchronous engine, token for
token, for greedy and seeded sampling (each seeded request's generator draws in the same order).

The next step is launched ahead only when
- step n is a pure decode step (one sampled token per sequence, no prompt log-probs, no forks) over
  every running request, and no request waits for admission (otherwise the synchronous schedule
  admits it: a request added meanwhile starts one step after the step in flight);
- no request in it needs its tokens on the host to sample the next one: penalties, a min_tokens
  mask still active and logprobs make the whole step synchronous;
- the KV pool has the next slot of every continuing sequence without preempting anyone.
Sequences that reach max_tokens at step n are simply left out of step n+1. A sequence that ends in
another way at step n (EOS or stop token, stop string, abort) has its step n+1 row discarded; that
row wrote its KV into the request's own last block, which is partly filled, owned by it alone (only
full blocks are shared) and never registered in the prefix cache (only full computed blocks are).
The request frees it; a later owner writes it on the same stream, after that row.

On by default on CUDA; `EngineConfig(extra={"overlap_decode": True})` turns it on elsewhere (the CPU
tests use it) and False turns it off; the environment variable EMBER_OVERLAP_DECODE=0 (or 1)
overrides both. The GPU tests compare it with synchronous steps token for token, up to 64
concurrent requests, with CUDA graphs and eagerly, adapters included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig, env_switch
from engine.cuda_graphs import is_decode
from engine.request import Request
from engine.runner import ModelOutput
from engine.sampler import SamplerOutput, SamplingRow
from engine.scheduler import Scheduler, SchedulerOutput

ENV = "EMBER_OVERLAP_DECODE"


def overlap_enabled(config: EngineConfig, device: torch.device) -> bool:
    """The environment variable EMBER_OVERLAP_DECODE, else extra["overlap_decode"], else on for CUDA."""
    env = env_switch(ENV)
    if env is not None:
        return env
    forced = config.extra.get("overlap_decode")
    return device.type == "cuda" if forced is None else bool(forced)


class HostTokens:
    """A step's sampled token ids on their way to the host: the copy is queued right after sampling,
    before any later step is launched, so reading them waits for this step only."""

    def __init__(self, tokens: torch.Tensor):
        self.ready = None
        if tokens.is_cuda:
            tokens = tokens.to("cpu", non_blocking=True)  # into page-locked memory
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.tokens = tokens

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


@dataclass
class Flight:
    """A launched step, landed later: its tokens are read, the scheduler updated, outputs built."""

    plan: SchedulerOutput
    request_ids: list[str]  # the sampled rows: the plan's sampling sequences, then forked children
    requests: list[Request]  # the request of each sampled row, as it was at launch
    rows: list[SamplingRow]
    logits: torch.Tensor  # [len(request_ids), V] the sampled rows' raw logits (for logprobs)
    model_out: ModelOutput
    ahead: bool = False  # launched before the previous step's tokens were read
    tokens: torch.Tensor | None = None  # int64 [len(request_ids)] on the device, not read yet
    host: HostTokens | None = None  # their copy to the host
    output: SamplerOutput | None = None  # or: already read (synchronous sampling)


def is_live(scheduler: Scheduler, req: Request) -> bool:
    """Whether a request of an earlier launch still runs (it did not end; its id was not reused)."""
    return scheduler.requests.get(req.request_id) is req


def can_run_ahead(req: Request) -> bool:
    """Whether the request's next token can be sampled before its current one reaches the host.

    Called while its current token is in flight (num_output_tokens lags by one): the next token is
    its output number num_output_tokens + 2.
    """
    p = req.params
    return p.logprobs is None and not p.needs_penalties and p.min_tokens <= req.num_output_tokens + 1


def continuing_rows(flight: Flight, scheduler: Scheduler) -> list[int] | None:
    """Rows of `flight` that the next decode step can run before the flight's tokens are read;
    None when that step must be planned synchronously (see the module docstring)."""
    plan = flight.plan
    if flight.tokens is None or plan.forks or scheduler.waiting or not is_decode(plan):
        return None
    keep: list[int] = []
    live = 0
    for i, (seq, req) in enumerate(zip(plan.seqs, flight.requests)):
        if not is_live(scheduler, req):
            continue  # ended while the flight ran: its row is discarded
        if req.num_computed_tokens != seq.start_pos or not can_run_ahead(req):
            return None
        live += 1
        if req.num_output_tokens + 1 < req.max_tokens:  # otherwise this flight's token is its last
            keep.append(i)
    if live != len(scheduler.running) or not keep:
        return None
    return keep


def sampling_row_ahead(req: Request, generator: torch.Generator | None) -> SamplingRow:
    """The sampler's row for a request whose previous token is still in flight. can_run_ahead ruled
    out everything that reads the output (penalties, an active min_tokens mask), so none is given."""
    return SamplingRow(req.params, req.prompt_token_ids, (), frozenset(), generator)
