"""Limits and options of the HTTP server (model options belong to the ``Reranker``).

The connection limits exist because uvicorn alone never times out a client that sends a
partial request line, headers or body, or one that connects and sends nothing: each such
socket is held forever (issue 13, fault 5). The defaults are generous for real clients (a
32 MiB body over a slow link) and short for a stalled one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

API_KEY_ENV = "CROSSRANK_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it waits.

    ``api_key`` is kept out of ``repr`` so that logging the settings never leaks it.
    """

    api_key: str | None = field(default=None, repr=False)
    #: Most documents (or TEI texts) in one request; more is a 413.
    max_docs: int = 1000
    #: Most pairs waiting in the batching queue; a request that would exceed it is a 429
    #: (a 413 when it alone exceeds it, e.g. a chunk-mode request with too many windows).
    max_queue: int = 10_000
    #: Seconds a rerank request may take (tokenization, queueing, scoring); then a 504.
    request_timeout: float | None = 120.0
    #: Largest request body in bytes; more is a 413.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Seconds a client is told to wait (``Retry-After``) after a 429 or a 503.
    retry_after: int = 1
    #: Names the model is served under (vLLM's ``--served-model-name``): the first is reported
    #: as ``model`` everywhere, all are listed by the model routes. Empty: the Hub id as given,
    #: or a local directory's base name (never a local path).
    served_model_name: tuple[str, ...] = ()
    #: Seconds a client may take to send a request line and its headers (also the most a new
    #: connection may stay silent); then the connection is closed.
    timeout_header: float = 10.0
    #: Seconds a client may take to send a request body once its headers are in; then a 408.
    timeout_body: float = 60.0
    #: Seconds an idle keep-alive connection is kept open between requests (uvicorn's own).
    timeout_keep_alive: float = 5.0
    #: Most concurrent connections and requests; beyond it uvicorn answers 503 at once.
    limit_concurrency: int = 1024
    #: Largest request line plus headers in bytes; more closes the connection (431).
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_docs",
            "max_queue",
            "max_body_bytes",
            "retry_after",
            "limit_concurrency",
            "max_header_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_queue < self.max_docs:
            raise ValueError(
                f"max_queue={self.max_queue} must be >= max_docs={self.max_docs}: a request of "
                "max_docs documents must fit in an empty queue"
            )
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout!r}")
        for name in ("timeout_header", "timeout_body", "timeout_keep_alive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")
        if isinstance(self.served_model_name, str):  # one name given as a plain string
            object.__setattr__(self, "served_model_name", (self.served_model_name,))
        for name in self.served_model_name:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"served_model_name must be non-blank strings, got {name!r}")

    def served_name(self, model: str) -> str:
        """The name reported for a reranker loaded from ``model`` (Hub id or local path)."""
        if self.served_model_name:
            return self.served_model_name[0]
        return default_served_name(model)


def default_served_name(model: str) -> str:
    """``model`` as given when it is a Hub id; a local directory's base name otherwise, so
    that no response ever shows where the model lives on this machine."""
    expanded = os.path.expanduser(model)
    if os.path.isabs(expanded) or os.path.exists(expanded) or expanded.startswith("."):
        return os.path.basename(os.path.normpath(expanded)) or model
    return model


def api_key_from_env(given: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The API key: ``given`` (a command-line value) or ``$CROSSRANK_API_KEY``.

    A key that is set but empty or blank, from either source, is an error rather than "no
    auth": fail closed (issue 13, fault 4). Command-line parsers such as click treat an
    empty environment variable as unset, so the variable is read here, not by the parser.
    """
    if given is None:
        given = environ.get(API_KEY_ENV)
        source = f"${API_KEY_ENV}"
    else:
        source = "--api-key"
    if given is not None and not given.strip():
        raise ValueError(f"{source} is set but empty; set a key, or unset it to disable auth")
    return given
