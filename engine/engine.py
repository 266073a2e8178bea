"""The serving engine: requests in, incremental outputs out, one `step()` at a time.

`Engine.step()` is the flow of DESIGN.md: schedule -> execute -> sample -> update. `AsyncEngine`
runs that loop in the background for asyncio servers (see engine/async_engine.py).

A step is launched (model and sampler queued on the device) and then landed (its tokens read, the
scheduler updated, outputs built). With overlapped decode (engine/overlap.py, on by
default on CUDA) the decode step after it may be launched in between, so the GPU computes the
next step while the host lands this one; the next `step()` call lands that step.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.adapters import AdapterRef, AdapterRegistry, AdapterServingConfig
from engine.config import EngineConfig
from engine.errors import ContextLengthError, EmberError, InvalidRequestError
from engine.kv_cache import KVCacheManager
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.overlap import (Flight, HostTokens, continuing_rows, is_live, overlap_enabled,
                            sampling_row_ahead)
from engine.request import Request, RequestStatus
from engine.runner import ModelOutput, ModelRunner
from engine.sampler import RowLogprobs, Sampler, SamplerOutput, SamplingRow, device_tensor, prompt_logprobs
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


class StepError(EmberError):
    """A model step failed; the requests in it (`request_ids`, user ids) were aborted, the engine goes on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass
class EngineStats:
    """A snapshot for metrics (prefix-cache figures in tokens, totals cumulative)."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    tokens_computed_total: int = 0  # tokens the model actually ran (prefix hits excluded)
    num_steps: int = 0
    lora_adapters_resident: int = 0  # adapters loaded (serving-ready)
    lora_adapters_on_device: int = 0  # adapter versions in device slots
    lora_evictions: int = 0  # cumulative slot evictions
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were read

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Engine:
    """Continuous-batching engine over a paged KV cache.

    `Engine(config)` loads the checkpoint and tokenizer from `config.model`; tests and embedders may
    pass an already built `model` (and `tokenizer`, None for token-ids-only use) instead.
    """

    def __init__(self, config: EngineConfig, *, model: torch.nn.Module | None = None, tokenizer: Any = "load",
                 adapters: AdapterServingConfig | None = None):
        self.config = config
        if model is None:
            model = self._load_model(config)
        if isinstance(tokenizer, str) and tokenizer == "load":
            from engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(config.model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        window = self.model_config.sliding_window
        if window and self.max_model_len > window:
            # Attention here is always full; beyond the window the model would see more than it was
            # trained to, so the context stops at the window instead of silently giving other outputs.
            logger.warning("the checkpoint's sliding_window is %d; Ember attends over the full context, "
                           "so max_model_len is capped at %d", window, window)
            self.max_model_len = window
        if self.max_model_len > self.model_config.max_position_embeddings:
            logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                           self.max_model_len, self.model_config.max_position_embeddings)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must be at least max_model_len ({self.max_model_len})")
        # Adapter slots are allocated before the KV cache is sized, so the cache leaves room for them.
        self.adapters = AdapterRegistry(self.model, adapters) if adapters is not None else None
        self.adapter_refs: dict[str, AdapterRef] = {}  # user request id -> its adapter version
        self.runner = ModelRunner(self.model, config, self.max_model_len, adapters=self.adapters)
        if self.runner.num_blocks * config.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {self.runner.num_blocks * config.block_size} tokens, less than "
                             f"max_model_len {self.max_model_len}: raise kv_cache_tokens or lower max_model_len")
        kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill,
                                   adapter_fit=self.adapters.fits if self.adapters is not None else None)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.outputs = OutputProcessor(tokenizer)
        eos = set(self.model_config.eos_token_ids) | set(getattr(tokenizer, "eos_ids", ()) or ())
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = self.model_config.vocab_size
        self.generators: dict[str, torch.Generator] = {}
        self.groups: dict[str, list[str]] = {}  # user request id -> its choices' request ids
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.overlap = overlap_enabled(config, self.runner.device)
        self.overlapped_steps = 0
        self._in_flight: Flight | None = None  # a step launched by the previous step() call, not landed

    @staticmethod
    def _load_model(config: EngineConfig) -> torch.nn.Module:
        from engine.checkpoint import load_config, load_model

        device = torch.device(config.device or _default_device())
        dtype = config.dtype
        if dtype is None and device.type == "cuda" and load_config(config.model).torch_dtype in ("float32", None):
            dtype = "bfloat16"
        model, _ = load_model(config.model, dtype=dtype, device=str(device))
        return model

    # -- requests -------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request without queueing it; returns its resolved max_tokens.

        Raises InvalidRequestError (or ContextLengthError) naming what to fix.
        """
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary (0..{self.vocab_size - 1})",
                                      "prompt")
        for name, ids in (("logit_bias", list(params.logit_bias or ())), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequestError(f"{name} has token ids outside the vocabulary (0..{self.vocab_size - 1})",
                                          name)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none", "stop")
        n_prompt = len(prompt_token_ids)
        room = self.max_model_len - n_prompt
        if room <= 0:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens but the model's context is "
                                     f"{self.max_model_len} tokens (prompt plus output); shorten the prompt",
                                     "prompt")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(f"the prompt ({n_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                                     f"the model's context of {self.max_model_len} tokens; lower max_tokens to "
                                     f"at most {room} or shorten the prompt", "max_tokens")
        return params.max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    priority: int = 0, lora: Any = None, arrival_time: float | None = None) -> None:
        """Queue a request; raises InvalidRequestError / ContextLengthError before queueing anything."""
        params = params if params is not None else SamplingParams()
        prompt_token_ids = list(prompt_token_ids)
        max_tokens = self.validate(prompt_token_ids, params)
        ids = [request_id] + [f"{request_id}#{i}" for i in range(1, params.n)]
        if request_id in self.groups or any(i in self.scheduler.requests for i in ids):
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        lora = self._acquire_adapter(request_id, lora)
        requests = [Request(rid, prompt_token_ids, params, max_tokens, self.eos_token_ids, priority, lora,
                            group_id=request_id, index=i, arrival_time=arrival) for i, rid in enumerate(ids)]
        if params.seed is not None:
            for r in requests:
                self.generators[r.request_id] = self.sampler.make_generator(params.seed + r.index)
        self.scheduler.add(requests[0], requests[1:])
        self.outputs.add(request_id, requests)
        self.groups[request_id] = ids
        self.prompt_tokens_total += len(prompt_token_ids)

    def _acquire_adapter(self, request_id: str, lora: Any) -> Any:
        """Pin the current version of the named adapter for this request (released when it ends)."""
        if lora is None or self.adapters is None:
            if lora is not None:
                raise InvalidRequestError(f"adapter {lora!r} asked for, but this engine serves no adapters "
                                          "(start it with LoRA serving enabled)", "model")
            return None
        ref = self.adapters.acquire(lora)
        self.adapter_refs[request_id] = ref
        return ref

    def _release_adapter(self, request_id: str) -> None:
        ref = self.adapter_refs.pop(request_id, None)
        if ref is not None:
            self.adapters.release(ref)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final ("abort") output, None if unknown."""
        ids = self.groups.pop(request_id, None)
        if ids is None:
            return None
        self._release_adapter(request_id)
        for rid in ids:
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
            self.generators.pop(rid, None)
        self._drop_dead_flight()
        return self.outputs.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    @property
    def num_unfinished(self) -> int:
        return len(self.groups)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> sample -> update. Returns the outputs with news.

        A step launched ahead by the previous call is landed instead of scheduling a new one; with
        overlapped decode the step after this one may be launched before this one is landed.
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                return []
            try:
                flight = self._launch(plan)
            except Exception as exc:  # fail this step's requests only
                raise StepError(self._fail(plan), exc) from exc
        if self.overlap:
            self._in_flight = self._launch_ahead(flight)
        return self._land(flight)

    def _launch(self, plan: SchedulerOutput, input_ids: torch.Tensor | None = None) -> Flight:
        """Queue the forward and the sampler's device work; nothing here waits for the device.

        input_ids: the step's token ids on the device, for a step planned before they reached the host.
        """
        model_out = self.runner.execute(plan) if input_ids is None else self.runner.execute(plan, input_ids)
        return self._sample(plan, model_out, ahead=input_ids is not None)

    def _sample(self, plan: SchedulerOutput, model_out: ModelOutput, ahead: bool) -> Flight:
        """Sample a token for each row that ends a sequence's step (and each forked child).

        With overlapped decode on, the tokens stay on the device (the next step may read them there);
        otherwise they are read now, as a synchronous step always did.
        """
        ids = [s.request_id for s in plan.seqs if s.sample] + [child for child, _ in plan.forks]
        rows = [model_out.sample_rows[s.request_id] for s in plan.seqs if s.sample]
        rows += [model_out.sample_rows[parent] for _, parent in plan.forks]
        reqs = [self.scheduler.requests[rid] for rid in ids]
        batch = [sampling_row_ahead(r, self.generators.get(r.request_id)) if ahead else self._sampling_row(r)
                 for r in reqs]
        logits = model_out.logits
        if rows != list(range(logits.shape[0])):  # decode steps sample every row in order: no gather
            logits = logits[rows]
        flight = Flight(plan, ids, reqs, batch, logits, model_out, ahead=ahead)
        if not rows:
            flight.output = SamplerOutput([], [])
        elif self.overlap:
            flight.tokens = self.sampler.sample(logits, batch)
            flight.host = HostTokens(flight.tokens)
        else:
            flight.output = self.sampler(logits, batch)
        return flight

    def _sampling_row(self, r: Request) -> SamplingRow:
        # The output so far is copied only for the processors that read it (penalties, min_tokens):
        # a copy per request per step grows with the output and shows at large batches.
        return SamplingRow(r.params, r.prompt_token_ids,
                           r.output_token_ids if r.params.needs_penalties or r.params.min_tokens else (), r.stop_ids,
                           self.generators.get(r.request_id))

    def _launch_ahead(self, flight: Flight) -> Flight | None:
        """Launch the decode step after `flight` before its tokens are read, when that step is
        predictable (engine/overlap.py); its input ids come from the flight's device tokens."""
        keep = continuing_rows(flight, self.scheduler)
        if keep is None:
            return None
        plan = self.scheduler.schedule_next_decode([flight.plan.seqs[i] for i in keep])
        if plan is None:
            return None
        tokens = flight.tokens
        if len(keep) < tokens.shape[0]:
            tokens = tokens.index_select(0, device_tensor(keep, tokens.device, torch.long))
        try:
            nxt = self._launch(plan, tokens)
        except Exception:
            # Unexpected, and harmless to recover from: the same sequences run synchronously next
            # step (a persistent fault then fails them there). Not retried on every step after.
            logger.warning("launching a decode step ahead failed; overlapped decode is off from now on",
                           exc_info=True)
            self.overlap = False
            self.scheduler.discard(plan)
            return None
        self.overlapped_steps += 1
        return nxt

    def _land(self, flight: Flight) -> list[RequestOutput]:
        """Read a flight's tokens, then update the scheduler and build its outputs."""
        plan, keep = self._live_plan(flight)
        if not plan.seqs:  # normally dropped as soon as its last request ended (_drop_dead_flight)
            self.scheduler.discard(plan)
            return []
        try:
            sampled = self._read(flight, keep)
        except Exception as exc:  # fail this step's requests only (and a step launched after it)
            failed = self._fail(plan)
            self._drop_dead_flight()
            raise StepError(failed, exc) from exc
        touched = self.scheduler.update(plan, dict(zip(sampled.request_ids, sampled.output.token_ids)))
        outputs = self._make_outputs(touched, sampled)
        self._drop_dead_flight()
        return outputs

    def _live_plan(self, flight: Flight) -> tuple[SchedulerOutput, list[int] | None]:
        """A step launched ahead without the rows of requests that ended before it landed (None: all kept)."""
        if not flight.ahead:
            return flight.plan, None
        keep = [i for i, r in enumerate(flight.requests) if is_live(self.scheduler, r)]
        if len(keep) == len(flight.requests):
            return flight.plan, None
        seqs = tuple(flight.plan.seqs[i] for i in keep)  # a step ahead samples every sequence, in order
        return dataclasses.replace(flight.plan, seqs=seqs, num_batched_tokens=len(seqs)), keep

    def _read(self, flight: Flight, keep: list[int] | None) -> "_Sampled":
        """The flight's tokens (this waits for the device), log-probabilities and prompt log-probabilities."""
        ids, output = flight.request_ids, flight.output
        if output is None:
            tokens = flight.host.tolist()
            if keep is not None:  # a step ahead: no logprobs (can_run_ahead), no prompt rows
                ids, tokens = [ids[i] for i in keep], [tokens[i] for i in keep]
                return _Sampled(ids, SamplerOutput(tokens, [None] * len(ids)), [])
            output = SamplerOutput(tokens, Sampler.logprobs(flight.logits, tokens, flight.rows))
        scored = []
        for rid, (row0, start, count) in flight.model_out.prompt_rows.items():
            req = self.scheduler.requests[rid]
            count = min(count, req.num_prompt_tokens - 1 - start)  # the last prompt row predicts the output
            if count > 0:
                targets = req.prompt_token_ids[start + 1:start + 1 + count]
                logits = flight.model_out.logits[row0:row0 + count]
                scored.append((req.group_id, start, prompt_logprobs(logits, targets, req.params.prompt_logprobs)))
        return _Sampled(ids, output, scored)

    def _drop_dead_flight(self) -> None:
        """Forget the step launched ahead once none of its requests remains: nothing will read it, and
        its rows only wrote KV slots of requests that ended."""
        flight = self._in_flight
        if flight is not None and not any(is_live(self.scheduler, r) for r in flight.requests):
            self.scheduler.discard(flight.plan)
            self._in_flight = None

    def _make_outputs(self, touched: list[Request], sampled: "_Sampled") -> list[RequestOutput]:
        for group_id, start, rows in sampled.prompt_logprobs:
            self.outputs.record_prompt_logprobs(group_id, start, rows)
        self.generation_tokens_total += len(sampled.request_ids)
        logprobs = {rid: lp for rid, lp in zip(sampled.request_ids, sampled.output.logprobs) if lp is not None}
        outputs, stopped = self.outputs.process(touched, logprobs)
        for rid in stopped:  # ended by a stop string: release its blocks now
            req = self.scheduler.requests.get(rid)
            if req is not None:
                self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED, req.stop_reason)
        for out in outputs:
            if out.finished:
                for rid in self.groups.pop(out.request_id, []):
                    self.generators.pop(rid, None)
                self._release_adapter(out.request_id)
        return outputs

    def _fail(self, plan: SchedulerOutput) -> list[str]:
        failed_groups = []
        for rid in plan.request_ids:
            req = self.scheduler.requests.get(rid)
            if req is not None and req.group_id not in failed_groups:
                failed_groups.append(req.group_id)
        for gid in failed_groups:
            self.abort_request(gid)
        logger.exception("engine step failed; aborted %d request(s)", len(failed_groups))
        return failed_groups

    # -- observability --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_blocks_used=s.kv.pool.num_used_blocks,
            kv_blocks_total=s.kv.num_blocks,
            prefix_cache_queries=s.stats.prefix_cache_queries,
            prefix_cache_hits=s.stats.prefix_cache_hits,
            num_preemptions=s.stats.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            tokens_computed_total=s.stats.tokens_computed,
            num_steps=s.stats.steps,
            overlapped_steps=self.overlapped_steps,
            **(self.adapters.stats() if self.adapters is not None else {}),
        )


@dataclass
class _Sampled:
    request_ids: list[str]
    output: SamplerOutput
    prompt_logprobs: list[tuple[str, int, list[RowLogprobs]]]  # (group id, start position, rows)


def __getattr__(name: str):
    # AsyncEngine lives in engine/async_engine.py (it imports this module); the API also names it here.
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
