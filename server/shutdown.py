"""Graceful shutdown: on SIGTERM stop admitting (503), drain in-flight requests, then exit 0.

Plain uvicorn closes its listening socket at once on SIGTERM, so a client arriving during the drain
would see a refused connection instead of a 503 it can retry elsewhere. This server keeps listening
while it drains, answers new work with 503, and only then lets uvicorn shut down. A second SIGTERM,
or SIGINT, stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from server.state import ServerState

log = logging.getLogger("ember.server")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains the app's admitted requests before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    line = f"listening on http://{f'[{host}]' if ':' in host else host}:{port}"
                    # Written once the socket accepts and the engine is warm: scripts wait for this line,
                    # so it appears even when the log level hides info messages.
                    if log.isEnabledFor(logging.INFO):
                        log.info(line)
                    else:
                        print(line, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.state.admission.draining:
            # Signal handlers run between bytecodes of the main thread: hand the work to the loop.
            self._loop.call_soon_threadsafe(self.begin_drain)
            return
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # Exit code 0 after a SIGTERM shutdown: do not re-raise the signal on the way out.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    def begin_drain(self) -> None:
        """Stop admission and exit once in-flight requests finish (or `drain_timeout` passes)."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        admission = self.state.admission
        admission.start_draining()
        log.info("draining: %d request(s) in flight, waiting up to %.0f s", admission.in_flight, self.drain_timeout)
        if await admission.wait_idle(self.drain_timeout):
            log.info("drained; shutting down")
        else:
            log.warning("drain timeout: %d request(s) still in flight are cut off", admission.in_flight)
        self.should_exit = True
