"""Limits and options of the HTTP server (model options belong to the ``Reranker``).

The connection limits exist because uvicorn alone never times out a client that sends a
partial request line, headers or body, or one that connects and sends nothing: each such
socket is held forever (issue 13, fault 5). The defaults are generous for real clients (a
32 MiB body over a slow link) and short for a stalled one.

Each setting is declared once, with :func:`crossrank.options.option` (default, help text,
check), as the engine options are: ``crossrank serve`` generates its flags from these fields
(:func:`crossrank.options.option_fields`), so a new setting is one field here. A bad value
raises :class:`~crossrank.errors.OptionError` naming the setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crossrank.errors import OptionError
from crossrank.options import check_fields, option, positive_int

API_KEY_ENV = "CROSSRANK_API_KEY"

#: The settings that the HTTP server holding the client connections applies (uvicorn, through
#: :mod:`crossrank.server.connections`), not the app: a front door whose connections are held
#: by someone else (Ray Serve's HTTP proxy) cannot honour them. The others are applied by the
#: app (:func:`crossrank.server.create_app`) and hold wherever it runs.
CONNECTION_SETTINGS = (
    "timeout_header",
    "timeout_keep_alive",
    "limit_concurrency",
    "max_header_bytes",
)


def _positive_seconds(*, optional: bool = False) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise OptionError(name, f"{name} must be > 0 seconds, got {value!r}")

    return check


def _api_key(name: str, value: Any) -> None:
    if value is not None and not value.strip():
        raise OptionError(name, f"{name} must not be empty (leave it unset to disable auth)")


def _names(name: str, value: Any) -> None:
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise OptionError(name, f"{name} must be non-blank strings, got {item!r}")


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it waits.

    ``api_key`` is kept out of ``repr`` so that logging the settings never leaks it.
    """

    api_key: str | None = option(
        None,
        "Require 'Authorization: Bearer KEY' on the rerank and model routes. Prefer the "
        "environment variable: a command-line value is visible to other local users.",
        _api_key,
        secret=True,
        envvar=API_KEY_ENV,
    )
    max_docs: int = option(
        1000, "Most documents (or TEI texts) per request (more is a 413).", positive_int()
    )
    max_queue: int = option(
        10_000,
        "Most pairs waiting to be scored, at least max_docs; a request that would exceed it is "
        "a 429 (a 413 when it alone exceeds it, e.g. a chunk-mode request with too many "
        "windows).",
        positive_int(),
    )
    request_timeout: float | None = option(
        120.0,
        "Seconds a rerank request may take (tokenizing, queueing, scoring); then a 504.",
        _positive_seconds(optional=True),
    )
    max_body_bytes: int = option(
        32 * 1024 * 1024,
        "Largest request body in bytes; more is a 413.",
        positive_int(),
        flag=False,
    )
    retry_after: int = option(
        1,
        "Seconds a client is told to wait (Retry-After) after a 429 or a 503.",
        positive_int(),
        flag=False,
    )
    served_model_name: tuple[str, ...] = option(
        (),
        "Name reported as 'model' in responses, /v1/models, /info and /ready (default: the Hub "
        "id as given, or the model directory's base name; never a local path). Repeat for "
        "aliases: the first is reported, all are listed (vLLM's --served-model-name).",
        _names,
    )
    timeout_header: float = option(
        10.0,
        "Seconds a client may take to send the request line and headers (also the most a new "
        "connection may stay silent); then 408 and the connection is closed.",
        _positive_seconds(),
    )
    timeout_body: float = option(
        60.0,
        "Seconds a client may take to send a request body once its headers are in; then a 408.",
        _positive_seconds(),
    )
    timeout_keep_alive: float = option(
        5.0, "Seconds an idle keep-alive connection stays open.", _positive_seconds()
    )
    limit_concurrency: int = option(
        1024,
        "Most concurrent connections and requests (beyond it, uvicorn answers 503 at once).",
        positive_int(),
    )
    max_header_bytes: int = option(
        16 * 1024,
        "Largest request line plus headers in bytes, at least 256 (more is a 431 and the "
        "connection is closed).",
        positive_int(256),
    )

    def __post_init__(self) -> None:
        names = self.served_model_name
        if isinstance(names, str):  # one name given as a plain string
            object.__setattr__(self, "served_model_name", (names,))
        elif not isinstance(names, tuple):  # a list, as a command line gives it
            object.__setattr__(self, "served_model_name", tuple(names))
        check_fields(self)
        if self.max_queue < self.max_docs:
            raise OptionError(
                "max_queue",
                f"max_queue={self.max_queue} must be >= max_docs={self.max_docs}: a request of "
                "max_docs documents must fit in an empty queue",
            )

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
        raise OptionError(
            "api_key", f"{source} is set but empty; set a key, or unset it to disable auth"
        )
    return given
