"""First stage: dense retrieval over an exact FAISS index.

Embeddings are L2-normalised, so the inner product FAISS ranks by is the cosine similarity.
The index is exact (``IndexFlatIP``): a few thousand passages need no approximate index, and
an exact one keeps retrieval deterministic for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crossrank.rag.corpus import Passage

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its 1-based retrieval rank and cosine similarity."""

    passage: Passage
    rank: int
    score: float


class DenseIndex:
    """Embeds ``passages`` once and answers top-k cosine-similarity searches."""

    def __init__(
        self, embedder: SentenceTransformer, passages: Sequence[Passage], *, batch_size: int = 32
    ) -> None:
        import faiss

        if not passages:
            raise ValueError("cannot index an empty list of passages")
        self.embedder = embedder
        self.passages = list(passages)
        self.batch_size = batch_size
        vectors = self._embed([p.text for p in self.passages])
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.embedder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The top ``k`` passages of each query, best first (fewer if the pool is smaller)."""
        if k < 1:
            raise ValueError(f"k must be a positive int, got {k}")
        if not queries:
            return []
        scores, rows = self.index.search(self._embed(list(queries)), min(k, len(self.passages)))
        return [
            [
                Hit(self.passages[row], rank, float(score))
                for rank, (row, score) in enumerate(zip(q_rows, q_scores, strict=True), 1)
                if row >= 0
            ]
            for q_rows, q_scores in zip(rows, scores, strict=True)
        ]
