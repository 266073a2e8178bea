"""AsyncEngine: the Engine driven by a background asyncio task, one output queue per request.

Model steps run in one worker thread so the event loop stays responsive. Everything else (adding,
aborting, reading stats) happens on the event-loop thread; while a step is in flight, adds and
aborts are queued and applied the moment it returns, so the engine's state is only ever touched
by one thread at a time.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from engine.config import EngineConfig
from engine.engine import Engine, EngineStats, StepError
from engine.errors import EmberError, EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Serve many concurrent `generate()` streams from one Engine.

    Cancel the consuming task or close the iterator (`contextlib.aclosing`) to abort a request: its
    blocks are freed at once, or right after the step in flight.
    """

    def __init__(self, config: EngineConfig | None = None, *, engine: Engine | None = None):
        if engine is None:
            if config is None:
                raise ValueError("give an EngineConfig or an Engine")
            engine = Engine(config)
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple[str, tuple]] = []  # ("add" | "abort", args) held during a step
        self._stepping = False
        self._stopping = False
        self._dead: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._barriers: list[asyncio.Future] = []
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_engine(cls, engine: Engine) -> "AsyncEngine":
        return cls(engine=engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_unfinished(self) -> int:
        """Requests queued or running (streams not yet finished)."""
        return len(self._queues)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background loop (generate() also starts it on first use)."""
        if self.is_running:
            return
        self._stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-step")
        self._task = asyncio.create_task(self._loop(), name="ember-engine-loop")

    async def shutdown(self) -> None:
        """Stop the loop after the step in flight; open streams end with EngineDeadError."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_all(EngineDeadError("the engine was shut down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- requests -------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0, lora: Any = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (deltas). Validation errors raise before anything is yielded;
        a failed step raises EmberError from the iterator; cancelling or closing it aborts the request."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead!r}")
        if not self.is_running:
            await self.start()
        params = params if params is not None else SamplingParams()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        prompt_token_ids = list(prompt_token_ids)
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit("add", (request_id, prompt_token_ids, params, priority, lora))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; an open stream of it ends with a finish_reason "abort" output."""
        self._submit("abort", (request_id,))

    async def barrier(self) -> None:
        """Wait until adds and aborts held behind the step in flight have been applied."""
        if self._stepping:
            fut = asyncio.get_running_loop().create_future()
            self._barriers.append(fut)
            await fut

    def _submit(self, op: str, args: tuple) -> None:
        if self._stepping:
            self._pending.append((op, args))
        else:
            self._apply(op, args)
        if self._wake is not None:
            self._wake.set()

    def _apply(self, op: str, args: tuple) -> None:
        if op == "abort":
            out = self.engine.abort_request(*args)
            queue = self._queues.get(args[0])
            if out is not None and queue is not None:
                queue.put_nowait(out)
            return
        request_id = args[0]
        try:
            self.engine.add_request(*args)
        except EmberError as exc:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(exc)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for op, args in pending:
            self._apply(op, args)
        barriers, self._barriers = self._barriers, []
        for fut in barriers:
            if not fut.done():
                fut.set_result(None)

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._stepping = True
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                except StepError as err:
                    outputs = []
                    for rid in err.request_ids:
                        queue = self._queues.get(rid)
                        if queue is not None:
                            queue.put_nowait(EmberError(f"generation failed: {err.cause!r}"))
                finally:
                    self._stepping = False
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                self._apply_pending()
        except Exception as exc:  # a bug outside a model step: nothing can be trusted any more
            logger.exception("engine loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc!r}"))
        finally:
            self._stepping = False
            self._apply_pending()

    def _fail_all(self, exc: EmberError) -> None:
        for queue in self._queues.values():
            queue.put_nowait(exc)
