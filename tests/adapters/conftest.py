"""Fixtures of the adapter tests: the real engine reporting a best span per document.

The RAG fixtures the adapters share with the RAG tests (passages, all-MiniLM-L6-v2, the
registry's engine) and the decoder (LLM) reranker assets of tests/backends/llm_assets.py are
in tests/conftest.py.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from crossrank import Reranker, RerankResult


class SpanReranker(Reranker):
    """The real engine, reporting each document's full extent after its first character as
    its best span (as the long-document path reports its best window)."""

    def rerank(self, *args: Any, **kwargs: Any) -> list[RerankResult]:
        return [self._span(r) for r in super().rerank(*args, **kwargs)]

    async def arerank(self, *args: Any, **kwargs: Any) -> list[RerankResult]:
        return [self._span(r) for r in await super().arerank(*args, **kwargs)]

    @staticmethod
    def _span(result: RerankResult) -> RerankResult:
        return dataclasses.replace(result, best_span=(1, len(result.document)))


@pytest.fixture(scope="session")
def span_reranker(tiny_reranker: Reranker) -> SpanReranker:
    """A :class:`SpanReranker` sharing ``tiny_reranker``'s loaded model (no second load)."""
    clone = copy.copy(tiny_reranker)
    clone.__class__ = SpanReranker
    return clone  # type: ignore[return-value]
