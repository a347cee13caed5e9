"""Retrieve-then-rerank: FAISS top ``k`` → crossrank reorders all ``k`` → the best ``n`` go
to the LLM prompt.

Every retrieved passage is reranked (not only the best ``n``) so that evaluation can score
the full reranked list and the demo can show where each passage moved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crossrank.rag.llm import build_prompt
from crossrank.rag.retrieval import DenseIndex, Hit

if TYPE_CHECKING:
    from crossrank.engine import Reranker

DEFAULT_TOP_K = 50
DEFAULT_TOP_N = 5


@dataclass(frozen=True)
class Ranked:
    """A retrieved passage after reranking: its 1-based reranked rank and reranker score."""

    hit: Hit
    rank: int
    score: float


@dataclass(frozen=True)
class QueryRun:
    """One query through the pipeline; ``timings`` are seconds per stage."""

    query: str
    retrieved: list[Hit]
    reranked: list[Ranked]
    timings: dict[str, float] = field(default_factory=dict)

    def top(self, n: int = DEFAULT_TOP_N) -> list[Ranked]:
        return self.reranked[:n]

    def prompt(self, n: int = DEFAULT_TOP_N) -> str:
        """The LLM prompt citing the best ``n`` reranked passages by id, best first."""
        return build_prompt(
            self.query, [(r.hit.passage.id, r.hit.passage.text) for r in self.top(n)]
        )


class Pipeline:
    """A :class:`DenseIndex` and a :class:`Reranker`, run query by query."""

    def __init__(self, index: DenseIndex, reranker: Reranker, *, top_k: int = DEFAULT_TOP_K):
        if top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k}")
        self.index = index
        self.reranker = reranker
        self.top_k = top_k

    def run(self, query: str) -> QueryRun:
        return next(self.run_many([query]))

    def run_many(self, queries: Sequence[str], *, batch_size: int = 64) -> Iterator[QueryRun]:
        """Queries are embedded and searched ``batch_size`` at a time (each query is charged
        its share of that batch's retrieval time), then reranked one by one."""
        for start in range(0, len(queries), batch_size):
            batch = list(queries[start : start + batch_size])
            began = time.perf_counter()
            hits = self.index.search(batch, self.top_k)
            retrieve_s = (time.perf_counter() - began) / len(batch)
            for query, query_hits in zip(batch, hits, strict=True):
                began = time.perf_counter()
                results = self.reranker.rerank(query, [h.passage.text for h in query_hits])
                rerank_s = time.perf_counter() - began
                reranked = [
                    Ranked(query_hits[r.index], rank, r.score) for rank, r in enumerate(results, 1)
                ]
                yield QueryRun(
                    query, query_hits, reranked, {"retrieve": retrieve_s, "rerank": rerank_s}
                )
