"""Limits and options of the HTTP server (model options belong to the ``Reranker``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it waits.

    ``api_key`` is kept out of ``repr`` so that logging the settings never leaks it.
    """

    api_key: str | None = field(default=None, repr=False)
    #: Most documents (or TEI texts) in one request; more is a 413.
    max_docs: int = 1000
    #: Most pairs waiting in the batching queue; a request that would exceed it is a 429.
    max_queue: int = 10_000
    #: Seconds a rerank request may take (tokenization, queueing, scoring); then a 504.
    request_timeout: float | None = 120.0
    #: Largest request body in bytes; more is a 413.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Seconds a client is told to wait (``Retry-After``) after a 429 or a 503.
    retry_after: int = 1
    #: Name reported as ``model``; ``None`` reports the reranker's model name.
    model_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_docs", "max_queue", "max_body_bytes", "retry_after"):
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
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")
