"""The small result type returned by :meth:`crossrank.Reranker.rerank`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One ranked document.

    ``index`` is the document's position in the list the caller passed, so results can be
    joined back to the caller's own objects without string matching. ``score`` is a plain
    Python ``float`` (JSON-serialisable, unlike ``numpy.float32``). ``best_span`` holds the
    character offsets ``(start, end)`` of the best-scoring window when long documents are
    chunked, and ``None`` otherwise.
    """

    index: int
    score: float
    document: str
    best_span: tuple[int, int] | None = None
