"""Run one HTTP request's prompts through the engine as a single stream of outputs.

A completions request may carry several prompts; each becomes its own engine request and their
outputs are merged in arrival order, tagged with the prompt's index. Leaving the iterator early
(client gone, error, cancellation) closes every engine iterator, which aborts those requests in
the engine and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator

from server.tracking import GenerationTracker

_END = object()


async def _follow(engine: Any, prompt: list[int], params: Any, request_id: str,
                  tracker: GenerationTracker, adapter: str | None) -> AsyncIterator[Any]:
    """One engine request's outputs, with its tracker kept up to date."""
    gen = engine.generate(prompt, params, request_id=request_id, lora=adapter)
    try:
        async for out in gen:
            tracker.observe(out)
            yield out
    finally:
        if not tracker.done:
            tracker.aborted()
        await gen.aclose()


async def run_prompts(engine: Any, prompts: list[list[int]], params: Any, request_id: str,
                      trackers: list[GenerationTracker], adapter: str | None = None
                      ) -> AsyncIterator[tuple[int, Any]]:
    """Yield `(prompt_index, RequestOutput)` for every output of every prompt."""
    if len(prompts) == 1:
        async with aclosing(_follow(engine, prompts[0], params, request_id, trackers[0], adapter)) as outs:
            async for out in outs:
                yield 0, out
        return

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            follow = _follow(engine, prompts[i], params, f"{request_id}-{i}", trackers[i], adapter)
            async with aclosing(follow) as outs:
                async for out in outs:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
