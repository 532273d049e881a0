"""Run the app under uvicorn: in the foreground (`vlsafe serve`) or in a thread on a free loopback port (tests,
benchmarks). On SIGTERM/SIGINT the batcher closes first (new requests: 503) and uvicorn's graceful shutdown lets
the requests already accepted finish, queued ones included."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with the app's batcher closed as soon as a shutdown is asked for."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        app = self.config.app
        loop = getattr(app.state, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(app.state.batcher.close)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; queued requests get `drain_s` to finish."""
    drain = app.state.settings.drain_s
    GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=int(drain) + 1)).run()


@dataclass
class RunningServer:
    url: str            # http://127.0.0.1:PORT
    server: GracefulServer
    app: FastAPI

    def call(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the server's event loop (e.g. `app.state.batcher.close`)."""
        self.app.state.loop.call_soon_threadsafe(fn, *args)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning",
                   start_timeout_s: float = 30.0) -> Iterator[RunningServer]:
    """`app` served by uvicorn in a background thread on a free port of `host`; stopped (gracefully) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = GracefulServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlsafe-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://{host}:{port}", server, app)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
