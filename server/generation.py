"""Run one HTTP request's prompts through the engine as a single stream of outputs.

Each prompt becomes its own engine request, followed by a pump task that moves its outputs into one
queue, tagged with the prompt's index. The pumps start at once, so after `started()` every request
has been handed to the engine (queued or running) before the first token exists: a stream can tell
its client "admitted" truthfully. `aclose()` (client gone, error, cancellation) cancels the pumps,
which closes the engine iterators, which aborts those requests and frees their KV blocks.
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
    try:
        async with aclosing(engine.generate(prompt, params, request_id=request_id, lora=adapter)) as outputs:
            async for out in outputs:
                tracker.observe(out)
                yield out
    finally:
        if not tracker.done:
            tracker.aborted()


class EngineRun:
    """The merged outputs of several engine requests: `async for prompt_index, output in run`."""

    def __init__(self, engine: Any, prompts: list[list[int]], params: Any, request_id: str,
                 trackers: list[GenerationTracker], adapter: str | None = None):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._remaining = len(prompts)
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        self._tasks = [asyncio.create_task(self._pump(i, _follow(engine, p, params, ids[i], trackers[i], adapter)))
                       for i, p in enumerate(prompts)]

    async def _pump(self, index: int, outputs: AsyncIterator[Any]) -> None:
        try:
            async with aclosing(outputs) as outs:
                async for out in outs:
                    self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put_nowait((index, exc))

    async def started(self) -> None:
        """Return once every pump has handed its request to the engine.

        A new task's first step is scheduled before this coroutine's resumption, and runs up to the
        engine's add, so one pass of the loop is enough.
        """
        await asyncio.sleep(0)

    def __aiter__(self) -> "EngineRun":
        return self

    async def __anext__(self) -> tuple[int, Any]:
        while self._remaining:
            index, item = await self._queue.get()
            if item is _END:
                self._remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return index, item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
