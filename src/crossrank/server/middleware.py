"""Pure ASGI middleware: request metrics, API-key checks, the request body limits and the
access log.

The first three run before the body is parsed, so an unauthenticated client never gets its
body parsed (it learns nothing about the schema), an oversized body is refused as it
arrives, a body that trickles in too slowly is cut off (408), and every response, errors
included, is counted. The access log line is written once the response is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, cast

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from crossrank.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from uvicorn._types import HTTPScope

UNAUTHORIZED_MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


class _StatusNotingSend:
    """An ASGI ``send`` that notes the response's status (``None`` until it starts)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)


class MetricsMiddleware:
    """Count requests by route and status, time them and track how many are in flight."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, routes: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"  # bounded label cardinality
        noted = _StatusNotingSend(send)
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, noted)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            # 500: what the client sees if the app raises before responding
            self.metrics.requests.labels(route, str(noted.status or 500)).inc()


class AccessLogMiddleware:
    """uvicorn's access log line for each response, written once the response is sent.

    uvicorn writes the line itself before the response's first byte, on the event loop: the
    formatting and the write of the log record delayed every response (0.26 ms per 1x50
    request on a 2-core CPU with the engine's scoring stubbed; ``docs/benchmarks.md``,
    issue 14 section). The line is the same (same logger,
    ``uvicorn.access``, same arguments, so uvicorn's formatter, its log configuration and
    :class:`~crossrank.server.connections.RedactQueryFilter` apply as before); uvicorn's own
    is switched off by the protocol of :func:`~crossrank.server.connections.uvicorn_config`.
    A request whose client went away before any response is not logged, as by uvicorn.
    """

    def __init__(self, app: ASGIApp, *, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        noted = _StatusNotingSend(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            if noted.status is not None and self.logger.isEnabledFor(logging.INFO):
                http_scope = cast("HTTPScope", scope)
                self.logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(http_scope),
                    scope["method"],
                    get_path_with_query_string(http_scope),
                    scope["http_version"],
                    noted.status,
                )


class BodyTooLargeError(HTTPException):
    """The request body exceeds the server's limit (raised while reading it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {limit} bytes")


class BodyTimeoutError(HTTPException):
    """The request body did not arrive within the server's limit (raised while reading it)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            408, f"the request body did not arrive within this server's limit of {timeout} s"
        )


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes (at once from ``Content-Length``, else while
    reading) or not complete within ``timeout`` seconds of the first read.

    While reading, :class:`BodyTooLargeError` or :class:`BodyTimeoutError` is raised from
    ``receive``; FastAPI re-raises HTTP exceptions met while reading a body, so the app's
    JSON error handler answers it. Once the body is complete, ``receive`` is passed through
    untimed (the app then waits on it for a disconnect).
    """

    def __init__(self, app: ASGIApp, *, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_json(send, 413, BodyTooLargeError(self.limit).detail)
                return
        received = 0
        complete = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete or self.timeout is None:
                message = await receive()
            else:
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self.timeout
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    raise BodyTimeoutError(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class ApiKeyMiddleware:
    """Refuse requests to ``protected`` paths without ``Authorization: Bearer <api_key>``.

    The comparison is constant-time (``hmac.compare_digest``) and the key is never logged.
    """

    def __init__(self, app: ASGIApp, *, api_key: str, protected: Collection[str]) -> None:
        self.app = app
        self._key = api_key.encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.protected:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        # evaluate compare_digest unconditionally so timing does not depend on the scheme
        if hmac.compare_digest(token.strip(), self._key) & (scheme.lower() == b"bearer"):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, UNAUTHORIZED_MESSAGE, [(b"www-authenticate", b"Bearer")])


async def _send_json(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An error response in the app's shape, sent before the app runs."""
    body = json.dumps({"message": message, "detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
