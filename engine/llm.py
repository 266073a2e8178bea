"""Offline batch generation: many prompts through one Engine at once, results in input order."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, RequestOutputAccumulator
from engine.sampling import SamplingParams


class LLM:
    """`LLM(model_dir, **engine_kwargs).generate(prompts, params)` -> final outputs in input order.

    Prompts are strings (encoded with the checkpoint's tokenizer, BOS as it configures) or lists of
    token ids. Each returned RequestOutput is cumulative: whole text, all token ids and logprobs.
    """

    def __init__(self, model: str | None = None, *, engine: Engine | None = None, **engine_kwargs: Any):
        if engine is None:
            if model is None:
                raise ValueError("give a checkpoint directory or an Engine")
            engine = Engine(EngineConfig(model=model, **engine_kwargs))
        self.engine = engine
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; give token ids", "prompt")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Sequence[str | Sequence[int]] | str,
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one params for all, or one per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params):  # refuse the whole batch before queueing any of it
            self.engine.validate(ids, p)
        order = []
        results: dict[str, RequestOutputAccumulator] = {}
        for ids, p in zip(encoded, params):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            order.append(rid)
            results[rid] = RequestOutputAccumulator()
        try:
            pending = set(order)
            while pending:
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].add(out)
                        if out.finished:
                            pending.discard(out.request_id)
        finally:
            for rid in order:  # an interrupted batch leaves nothing behind
                self.engine.abort_request(rid)
        return [results[rid].result for rid in order]
