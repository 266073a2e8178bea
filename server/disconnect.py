"""Cancel a non-streaming request's work when its client goes away.

The ASGI server reports a closed connection as an `http.disconnect` message on `receive`. The work
runs as a task raced against a watcher of that message; when the watcher wins, the work is cancelled,
which closes its engine iterators and so aborts the engine requests in whatever phase they are.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (watcher, task):
            if not t.done():
                t.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
