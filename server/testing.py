"""Run an Ember app on a real uvicorn server in a background thread (tests, notebooks, embedding).

The listening socket is bound and listening before the thread starts, so the port is known at
once and a client that connects early simply waits in the backlog until the app is ready: no
polling, no sleeps.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Iterator

import uvicorn


class LiveServer:
    """`with LiveServer(app) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"ember-server-{self.port}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the owner thread via `error`
            self.error = exc

    def start(self) -> "LiveServer":
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def serving(settings: Any, timeout: float = 120.0) -> Iterator[LiveServer]:
    """Build the app for `settings`, serve it, and return once it answers /health with 200."""
    import httpx

    from server.app import create_app

    srv = LiveServer(create_app(settings)).start()
    try:
        health = httpx.get(srv.url + "/health", timeout=timeout)  # waits in the backlog until ready
        if health.status_code != 200:
            raise RuntimeError(f"server not ready: {health.status_code} {health.text}")
        yield srv
    finally:
        srv.stop()
