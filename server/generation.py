"""Run one HTTP request's prompts through the engine as a single stream of outputs.

Each prompt becomes its own engine request; with several, a pump task per prompt moves its outputs
into one queue, tagged with the prompt's index. Work starts at once, so after `started()` every
request has been handed to the engine (queued or running) before the first token exists: a stream
can tell its client "admitted" truthfully. `aclose()` (client gone, error, cancellation) closes the
engine iterators, which aborts those requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator

from server.tracking import GenerationTracker

_END = object()


async def _follow(engine: Any, prompt: list[int], params: Any, request_id: str,
                  tracker: GenerationTracker, adapter: str | None, priority: int = 0) -> AsyncIterator[Any]:
    """One engine request's outputs, with its tracker kept up to date."""
    try:
        async with aclosing(engine.generate(prompt, params, request_id=request_id, priority=priority,
                                            lora=adapter)) as outputs:
            async for out in outputs:
                tracker.observe(out)
                yield out
    finally:
        if not tracker.done:
            tracker.aborted()


class SingleRun:
    """One engine request's outputs: `async for 0, output in run` (the common, one-prompt case).

    The first output is awaited by a task started at once, so the request reaches the engine before
    the consumer asks for anything; later outputs are awaited directly, with no extra hop per token.
    """

    def __init__(self, outputs: AsyncIterator[Any]):
        self._outputs = outputs
        self._first: asyncio.Task | None = asyncio.ensure_future(outputs.__anext__())

    async def started(self) -> None:
        """Return once the request has been handed to the engine (see `MergedRun.started`)."""
        await asyncio.sleep(0)

    def __aiter__(self) -> "SingleRun":
        return self

    async def __anext__(self) -> tuple[int, Any]:
        if self._first is not None:
            first, self._first = self._first, None
            return 0, await first
        return 0, await self._outputs.__anext__()

    async def aclose(self) -> None:
        if self._first is not None:  # still inside the generator: cancel it there, then it is closed
            self._first.cancel()
            await asyncio.gather(self._first, return_exceptions=True)
            self._first = None
        await self._outputs.aclose()


class MergedRun:
    """The merged outputs of several engine requests: `async for prompt_index, output in run`."""

    def __init__(self, streams: list[AsyncIterator[Any]]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._remaining = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, stream)) for i, stream in enumerate(streams)]

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

    def __aiter__(self) -> "MergedRun":
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


EngineRun = SingleRun | MergedRun


def start_run(engine: Any, prompts: list[list[int]], params: Any, request_id: str,
              trackers: list[GenerationTracker], adapter: str | None = None, priority: int = 0) -> EngineRun:
    """Hand every prompt to the engine now; iterate the result for `(prompt_index, RequestOutput)`."""
    if len(prompts) == 1:
        return SingleRun(_follow(engine, prompts[0], params, request_id, trackers[0], adapter, priority))
    return MergedRun([_follow(engine, p, params, f"{request_id}-{i}", trackers[i], adapter, priority)
                      for i, p in enumerate(prompts)])
