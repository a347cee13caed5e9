"""uvicorn's configuration, with connection-level defences: slow clients, oversized headers,
leaky access logs.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` and caps
concurrency with ``limit_concurrency``, but it has no timeout for a client that connects and
sends nothing, or a partial request line or headers: an adversarial pass held such sockets
open for minutes (issue 13, fault 5). :func:`guarded_protocol` adds a header deadline and a
header size cap to uvicorn's own HTTP protocol class (httptools when installed, else h11);
the body deadline lives in :class:`~crossrank.server.middleware.BodyLimitMiddleware`, where
the ASGI ``receive`` calls are visible.

uvicorn's access log prints the request target with its query string, so a key sent as
``?api_key=...`` (refused, but logged) reached the log (fault 16): :class:`RedactQueryFilter`
replaces the value of every credential-looking query parameter before the line is written.
The line itself is written once the response is sent
(:class:`~crossrank.server.middleware.AccessLogMiddleware`), not before its first byte.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from crossrank.server.middleware import AccessLogMiddleware
from crossrank.server.settings import ServerSettings

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[REDACTED]"
#: Query parameter names that may carry a credential (matched anywhere in the name).
_CREDENTIAL = re.compile(
    r"key|token|secret|passw|pwd|auth|signature|sig$|credential|session", re.IGNORECASE
)


def redact_query(target: str) -> str:
    """``target`` (a path with an optional query string) with the value of each
    credential-looking parameter replaced by ``[REDACTED]``."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for part in re.split(r"([&;])", query):
        name, eq, _ = part.partition("=")
        if eq and _CREDENTIAL.search(unquote_plus(name)):
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{path}?{''.join(parts)}"


class RedactQueryFilter(logging.Filter):
    """Redacts credential-looking query parameters in uvicorn's access log lines, whose
    arguments are ``(client, method, path?query, http_version, status)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install_access_log_redaction() -> RedactQueryFilter:
    """Add the redacting filter to uvicorn's access logger (once); returns it."""
    logger = logging.getLogger(ACCESS_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, RedactQueryFilter):
            return existing
    redactor = RedactQueryFilter()
    logger.addFilter(redactor)
    return redactor


_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
)
_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
    b"content-length: 0\r\n\r\n"
)


def guarded_protocol(settings: ServerSettings) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a header deadline and a header size cap, and
    without uvicorn's access log line (:class:`AccessLogMiddleware` writes it instead).

    From the moment a connection opens, or the first byte of a next request arrives on a
    kept-alive one, the request line and headers must be complete within
    ``settings.timeout_header`` seconds and ``settings.max_header_bytes`` bytes; otherwise
    the client gets a 408 (431) and the connection is closed (a connection that sent nothing
    is just closed).
    """
    timeout = settings.timeout_header
    limit = settings.max_header_bytes
    base: Any = AutoHTTPProtocol

    class GuardedHTTPProtocol(base):
        _header_deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False  # the app's AccessLogMiddleware writes the line

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            awaiting = self._awaiting_headers()
            if awaiting and self._header_deadline is None:  # a next request on a kept-alive one
                self._arm_header_deadline()
            super().data_received(data)
            if not awaiting:
                return
            if not self._awaiting_headers():
                self._disarm_header_deadline()
                return
            self._header_bytes += len(data)
            if self._header_bytes > limit:
                self._refuse(_TOO_LARGE_RESPONSE)

        def _awaiting_headers(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def _arm_header_deadline(self) -> None:
            self._header_bytes = 0
            self._header_deadline = self.loop.call_later(timeout, self._header_timed_out)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_timed_out(self) -> None:
            self._header_deadline = None
            if self._awaiting_headers():
                self._refuse(_TIMEOUT_RESPONSE if self._header_bytes else b"")

        def _refuse(self, response: bytes) -> None:
            self._disarm_header_deadline()
            if self.transport.is_closing():
                return
            if response:
                self.transport.write(response)
            self.transport.close()

    return GuardedHTTPProtocol


def uvicorn_config(app: ASGIApp, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` serving ``app`` with ``settings``' connection limits (header,
    body and keep-alive timeouts, concurrency, header size) and the access log written once
    each response is sent; ``options`` are passed on (host, port, log level...)."""
    return uvicorn.Config(
        AccessLogMiddleware(app, logger=logging.getLogger(ACCESS_LOGGER)),
        http=guarded_protocol(settings),
        # uvicorn takes any number of seconds here, though it annotates an int
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
        limit_concurrency=settings.limit_concurrency,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        **options,
    )
