"""Run the app on uvicorn: bind, serve, shut down gracefully, exit non-zero on a failed load.

On SIGINT/SIGTERM uvicorn stops accepting connections, lets in-flight requests finish, then
runs the app's shutdown (which stops the forward-pass worker). The settings' connection
limits (header, body and keep-alive timeouts, concurrency, header size) and the access log
are applied to uvicorn here; see :mod:`crossrank.server.connections`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import httpx
import uvicorn

from crossrank.server.app import RerankerSource, create_app
from crossrank.server.connections import install_access_log_redaction, uvicorn_config
from crossrank.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def run_server(
    reranker_or_factory: RerankerSource,
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve until interrupted; returns the process exit code (1 if the model failed to load)."""
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(err: BaseException) -> None:
        failures.append(err)
        if server is not None:
            server.should_exit = True

    app = create_app(reranker_or_factory, settings, on_load_error=stop, on_ready=freeze_heap)
    config = uvicorn_config(app, settings, host=host, port=port, log_level=log_level)
    install_access_log_redaction()  # after uvicorn configured its loggers
    server = uvicorn.Server(config)
    logger.info("API key auth is %s", "on" if settings.api_key else "off")
    server.run()
    return 1 if failures else 0


def freeze_heap() -> None:
    """Collect once, then leave every object alive now out of later collections.

    The process serves from here on, and what is alive now (torch, transformers, FastAPI,
    the model: about 430,000 objects with the tiny test model) stays alive. Every automatic
    full collection walked all of it, holding the GIL meanwhile, so every thread and the
    event loop stopped: 377-384 ms per full collection on a 2-core CPU, 0.0 ms once frozen
    (``gc.freeze``, as long-running servers do after start-up; objects created while serving
    are collected as usual). Only the command-line server does this: it owns its process,
    where an app embedded in another one leaves that process's collector alone.
    """
    gc.collect()
    gc.freeze()


class BackgroundServer:
    """Serve an app on uvicorn from a daemon thread: for tests, notebooks and benchmarks.

    ``port=0`` picks a free port; :attr:`url` says which. Use as a context manager, or call
    :meth:`start` and :meth:`stop`. Stopping is graceful, as on SIGTERM. ``settings`` gives
    the connection limits (the defaults of :class:`ServerSettings` otherwise).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        settings: ServerSettings | None = None,
    ) -> None:
        config = uvicorn_config(
            app,
            settings or ServerSettings(),
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, name="crossrank-server", daemon=True
        )
        self.url = ""

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the socket is bound (the model may still be loading)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``GET /ready`` answers 200."""
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} was not ready within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting connections, let in-flight requests finish, run the app's shutdown."""
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
