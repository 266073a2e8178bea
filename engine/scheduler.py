"""Continuous batching by token counts: every step closes part of each request's computed-token gap.

Each request has `num_tokens` (prompt + output so far) and `num_computed_tokens` (KV written).
A step hands out tokens under a budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`): running requests first (a decode needs one token, an unfinished prefill the rest
of its prompt, in chunks), then waiting requests in (priority, arrival) order. Prefix-cache hits
simply start a request with computed tokens; a preempted request restarts at zero computed tokens
but keeps its output, so prefill, chunked prefill, cache hits and recompute are one code path.

When blocks run out, the last running request in scheduling order (lowest priority, newest) is
preempted: its blocks are freed and it waits to be recomputed. A waiting request more urgent than
running ones (a lower priority value) preempts the least urgent of them when it could not start
otherwise. No torch here.

`schedule_next_decode` plans a decode step before the previous step's tokens are known (overlapped
decode, engine/overlap.py): the same sequences one position on, their token ids still on the device.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


UNKNOWN_TOKEN = -1  # the token id of a step planned before its token was sampled (never embedded)


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step (a named tuple: built for every running sequence each step,
    at a third less host time than a frozen dataclass)."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens whose KV is computed this step
    start_pos: int  # position of token_ids[0] (tokens already computed before this step)
    block_ids: tuple[int, ...]  # the whole block table, covering start_pos + len(token_ids) tokens
    sample: bool  # the step reaches the sequence's last token: sample the next one from its logits
    prompt_logprobs: bool  # logits of every row are wanted (log-probabilities of the prompt)
    adapter: tuple[Hashable, ...] | None = None


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes: sequences with token counts and block ids, never live requests."""

    seqs: tuple[ScheduledSeq, ...] = ()
    # (child, parent): the child's first token is sampled from the parent's logits row (n > 1).
    forks: tuple[tuple[str, str], ...] = ()
    preempted: tuple[str, ...] = ()
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.seqs] + [child for child, _ in self.forks]


@dataclass
class SchedulerStats:
    """Cumulative counters (prefix-cache figures are in tokens)."""

    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    tokens_computed: int = 0
    steps: int = 0


@dataclass
class _Step:
    """Scratch state of one schedule() call."""

    budget: int
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    out_of_blocks: bool = False  # a running request was preempted because the KV pool ran out


class Scheduler:
    """Decides, step by step, which requests compute how many tokens in which KV blocks."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True,
                 adapter_fit: Callable[[set[tuple[Hashable, ...]]], bool] | None = None):
        self.kv = kv
        self.adapter_fit = adapter_fit  # whether a batch with these adapters fits the adapter slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []  # sorted by sort_key: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self.pending_forks: dict[str, list[Request]] = {}  # parent id -> siblings awaiting its prompt
        self.stats = SchedulerStats()

    # -- queue management ---------------------------------------------------------------------
    def add(self, request: Request, siblings: Iterable[Request] = ()) -> None:
        """Queue a request; siblings (other choices of n > 1) fork from it once its prompt is computed."""
        siblings = list(siblings)
        for r in [request, *siblings]:
            if r.request_id in self.requests:
                raise ValueError(f"request id {r.request_id!r} is already in use")
        for r in [request, *siblings]:
            self.requests[r.request_id] = r
        if siblings:
            self.pending_forks[request.request_id] = siblings
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: str | int | None = None) -> Request | None:
        """End a request in any state (finished, stopped by text, aborted) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            for siblings in self.pending_forks.values():
                if req in siblings:
                    siblings.remove(req)
        orphans = self.pending_forks.pop(request_id, [])
        for sibling in orphans:  # a parent ending before forking: its siblings compute for themselves
            bisect.insort(self.waiting, sibling, key=lambda r: r.sort_key)
        self.kv.free(request_id)
        if not req.is_finished:
            req.finish(status, stop_reason=stop_reason)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.requests) - len(self.running)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then admissions while budget remains."""
        step = _Step(budget=self.max_num_batched_tokens)
        self._preempt_for_priority(step)
        self._schedule_running(step)
        if not step.out_of_blocks:  # admitting while evicting for space would only thrash
            self._schedule_waiting(step)
        forks = self._fork_siblings(step)
        self.stats.steps += 1
        return SchedulerOutput(seqs=tuple(step.seqs), forks=tuple(forks), preempted=tuple(step.preempted),
                               num_batched_tokens=self.max_num_batched_tokens - step.budget)

    def schedule_next_decode(self, seqs: Sequence[ScheduledSeq]) -> SchedulerOutput | None:
        """The decode step after `seqs` (decode sequences of running requests), planned before their
        sampled tokens are known: each sequence one position on, its token UNKNOWN_TOKEN (the runner
        takes the real ones from the device). None, with nothing allocated, when the KV pool cannot
        give every sequence its next slot without preempting."""
        need = sum(self.kv.num_blocks_needed(s.request_id, s.start_pos + 2) for s in seqs)
        if need > self.kv.num_free_blocks:
            return None
        nxt = tuple(ScheduledSeq(request_id=s.request_id, token_ids=(UNKNOWN_TOKEN,), start_pos=s.start_pos + 1,
                                 block_ids=tuple(self.kv.allocate(s.request_id, s.start_pos + 2)), sample=True,
                                 prompt_logprobs=False, adapter=s.adapter) for s in seqs)
        self.stats.steps += 1
        return SchedulerOutput(seqs=nxt, num_batched_tokens=len(nxt))

    def discard(self, output: SchedulerOutput) -> None:
        """Forget a planned step that will never be applied (every request in it ended first): it does
        not count as a step. Blocks it allocated stay with their requests (freed when they end)."""
        self.stats.steps -= 1

    def _schedule_running(self, step: _Step) -> None:
        i = 0
        while i < len(self.running) and step.budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, step.budget)
            if num_new <= 0:
                i += 1
                continue
            scheduled = True
            while not self.kv.can_allocate(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim, step)
                step.out_of_blocks = True
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            self._schedule(req, num_new, step)
            i += 1

    def _preempt_for_priority(self, step: _Step) -> None:
        """Make room for a waiting request more urgent than running ones.

        When the head of the queue has a strictly lower priority value than the last running
        request and could not start this step (sequence cap, or too few free KV blocks for its
        first chunk once the running requests have grown to their current length), running requests of lower
        priority are preempted, the least urgent first, until it could. Requests of the same
        priority never preempt each other (first come, first served), and nothing is preempted
        when even all lower-priority requests' blocks (as their tables count them) would not make
        it fit.
        """
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        victims = [r for r in reversed(self.running) if r.priority > head.priority]
        if not victims or not self._adapter_fits(head):  # a head waiting for an adapter slot would not start
            return
        first_chunk = min(head.num_tokens, self.max_num_batched_tokens)
        need = self.kv.num_blocks_needed(head.request_id, first_chunk)
        growth = {r.request_id: self.kv.num_blocks_needed(r.request_id, r.num_tokens) for r in self.running}

        def blocked(running: int, free: int, grow: int) -> bool:
            return running >= self.max_num_seqs or free < need + grow

        running, free, grow = len(self.running), self.kv.num_free_blocks, sum(growth.values())
        if not blocked(running, free, grow):
            return
        chosen = []
        for victim in victims:
            chosen.append(victim)
            running -= 1
            free += len(self.kv.block_table(victim.request_id))
            grow -= growth[victim.request_id]
            if not blocked(running, free, grow):
                break
        else:
            return  # not enough to gain: preempt nobody
        for victim in chosen:
            self._preempt(victim, step)

    def _schedule_waiting(self, step: _Step) -> None:
        skipped: list[Request] = []  # their adapter would need one slot too many: they wait, others go on
        while self.waiting and step.budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not self._adapter_fits(req) or req.request_id in step.preempted:  # no re-admission in the same step
                skipped.append(self.waiting.pop(0))
                continue
            cached: list[int] = []
            if not self._wants_prompt_logprobs(req):  # cached tokens would have no logits
                cached = self.kv.find_cached_prefix(req.token_ids, req.adapter)
            num_cached = len(cached) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > step.budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = step.budget
            if not self.kv.can_allocate(req.request_id, num_cached + num_new, cached):
                break
            self.waiting.pop(0)
            self.kv.allocate(req.request_id, num_cached, cached)
            req.num_computed_tokens = num_cached
            if self.kv.enable_prefix_caching:
                self.stats.prefix_cache_queries += req.num_tokens
                self.stats.prefix_cache_hits += num_cached
            if req.num_cached_tokens is None:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            self._schedule(req, num_new, step)
        for req in skipped:
            bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def _adapter_fits(self, req: Request) -> bool:
        if self.adapter_fit is None or req.adapter is None:
            return True
        active = {r.adapter for r in self.running if r.adapter is not None}
        return req.adapter in active or self.adapter_fit(active | {req.adapter})

    def _schedule(self, req: Request, num_new: int, step: _Step) -> None:
        start = req.num_computed_tokens
        end = start + num_new
        table = self.kv.allocate(req.request_id, end)
        step.seqs.append(ScheduledSeq(
            request_id=req.request_id,
            token_ids=tuple(req.token_ids[start:end]),
            start_pos=start,
            block_ids=tuple(table),
            sample=end == req.num_tokens and req.max_tokens > 0,
            prompt_logprobs=self._wants_prompt_logprobs(req) and start < req.num_prompt_tokens,
            adapter=req.adapter,
        ))
        step.budget -= num_new

    def _preempt(self, req: Request, step: _Step) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)
        step.preempted.append(req.request_id)

    def _fork_siblings(self, step: _Step) -> list[tuple[str, str]]:
        """Siblings of a parent whose prompt completes this step share its full prompt blocks and
        sample their first token from its logits; those over the sequence cap wait as usual."""
        forks = []
        for seq in step.seqs:
            siblings = self.pending_forks.pop(seq.request_id, None) if seq.sample else None
            if not siblings:
                continue
            parent = self.requests[seq.request_id]
            for child in siblings:
                if len(self.running) >= self.max_num_seqs:
                    bisect.insort(self.waiting, child, key=lambda r: r.sort_key)
                    continue
                self.kv.fork(parent.request_id, child.request_id, parent.num_prompt_tokens)
                child.num_computed_tokens = (parent.num_prompt_tokens // self.kv.block_size) * self.kv.block_size
                child.num_cached_tokens = 0
                child.first_scheduled_time = time.monotonic()
                child.status = RequestStatus.RUNNING
                bisect.insort(self.running, child, key=lambda r: r.sort_key)
                forks.append((child.request_id, parent.request_id))
        return forks

    @staticmethod
    def _wants_prompt_logprobs(req: Request) -> bool:
        return req.params.prompt_logprobs is not None and req.index == 0 and req.num_output_tokens == 0

    # -- after the model ran ------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Advance computed counts, cache full blocks, append sampled tokens, finish by token rules.

        Returns the requests that got a token or finished this step (finished ones are already
        released).
        """
        now = time.monotonic()
        touched: list[Request] = []
        for seq in output.seqs:
            req = self.requests.get(seq.request_id)
            if req is None:  # aborted while the step ran
                continue
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            self.stats.tokens_computed += len(seq.token_ids)
            self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens, req.adapter)
            if seq.sample:
                req.append_token(sampled[req.request_id], now)
                touched.append(req)
            elif req.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                req.finish(RequestStatus.FINISHED_LENGTH, now)  # prompt scoring only
                touched.append(req)
        for child_id, _ in output.forks:
            req = self.requests.get(child_id)
            if req is not None:
                req.append_token(sampled[child_id], now)
                touched.append(req)
        for req in touched:
            if req.is_finished:
                self.finish(req.request_id, req.status, req.stop_reason)
        return touched

    def fail(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort requests whose step raised; returns those that were still known."""
        out = []
        for rid in request_ids:
            req = self.finish(rid, RequestStatus.FINISHED_ABORTED)
            if req is not None:
                out.append(req)
        return out
