"""Long documents: score every window of a document that does not fit, keep one score per document.

Most deployments cap a pair at 512 tokens and silently drop the rest of a long document, so
the relevant paragraph of a contract or report is never seen. In ``"chunk"`` mode the fast
tokenizer cuts such a document into overlapping token windows
(:meth:`crossrank.tokenization.PairTokenizer.encode_windows`), every window is scored in the
same token-budgeted batches as all other pairs, and :func:`aggregate` folds the window
scores back into one raw score per document plus the character span of its best window.

The work a document can cause is bounded: only its first ``max_windows`` windows (default
64, about 28k tokens at ``max_length=512``) are scored, as truncate mode scores only its
first window, and its text is cut before tokenizing to what those windows need
(:mod:`crossrank.tokenization`). A 30 MB document costs what a ~170 kB one does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crossrank.errors import OptionError
from crossrank.options import AGGREGATES, EngineOptions
from crossrank.tokenization import EncodedPairs, PairTokenizer


@dataclass(frozen=True)
class LongDocs:
    """How a document longer than the room left after the query is handled.

    ``mode="truncate"`` keeps its first tokens. ``mode="chunk"`` scores windows of
    ``chunk_tokens`` document tokens (``None``: all the room) overlapping by ``chunk_overlap``
    tokens (``None``: an eighth of the window) and folds them into one score with
    ``aggregate``; only the first ``max_windows`` windows of a document are scored. The values are checked by :class:`~crossrank.options.EngineOptions`;
    :meth:`check_room` adds the check that needs the tokenizer.
    """

    mode: str = "truncate"
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    aggregate: str = "max"
    max_windows: int = 64

    @classmethod
    def from_options(cls, options: EngineOptions) -> LongDocs:
        """The long-document settings of checked engine ``options``."""
        return cls(
            options.long_docs,
            options.chunk_tokens,
            options.chunk_overlap,
            options.aggregate,
            options.max_windows,
        )

    @property
    def chunked(self) -> bool:
        return self.mode == "chunk"

    def check_room(self, room: int) -> None:
        """Refuse settings whose windows cannot advance when the query leaves ``room`` tokens.

        ``room`` is the fewest document tokens a pair can hold (``max_length`` minus the
        longest capped query and the special tokens).
        """
        if not self.chunked or self.chunk_overlap is None:
            return
        window = room if self.chunk_tokens is None else min(self.chunk_tokens, room)
        if self.chunk_overlap >= window:
            raise OptionError(
                "chunk_overlap",
                f"chunk_overlap={self.chunk_overlap} must be smaller than the window "
                f"({window} document tokens after a query of query_max_length tokens); "
                "lower chunk_overlap or query_max_length, or raise chunk_tokens/max_length",
            )

    def encode(
        self,
        tokenizer: PairTokenizer,
        queries: Sequence[str],
        documents: Sequence[str],
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """``tokenizer``'s rows for validated pairs: one per pair (cut to ``max_length``), or
        in chunk mode a long document's windows (its first ``max_windows``), mapped back to
        their pair by ``pair_index``. ``cancel`` stops it between chunks; ``instruction`` is
        a decoder prompt's for this call (``None``: the tokenizer's)."""
        if self.chunked:
            return tokenizer.encode_windows(
                queries,
                documents,
                window_tokens=self.chunk_tokens,
                overlap=self.chunk_overlap,
                max_windows=self.max_windows,
                cancel=cancel,
                instruction=instruction,
            )
        return tokenizer.encode(queries, documents, cancel=cancel, instruction=instruction)

    def fingerprint(self) -> str:
        """The settings that change a document's score, for cache keys."""
        if not self.chunked:
            return "truncate"
        return f"chunk:{self.chunk_tokens}:{self.chunk_overlap}:{self.aggregate}:{self.max_windows}"


@dataclass(frozen=True)
class DocScores:
    """One raw float32 score per input pair, and in chunk mode the ``(start, end)`` character
    offsets of each document's best window (int64, shape ``(n, 2)``)."""

    raw: np.ndarray
    spans: np.ndarray | None


def aggregate(row_scores: np.ndarray, encoded: EncodedPairs, n: int, how: str) -> DocScores:
    """Fold the raw scores of ``encoded``'s rows into one score for each of its ``n`` pairs.

    ``how`` is ``"max"`` (best window), ``"mean"`` (mean of the window logits, so the per-call
    ``normalize`` stays a monotonic transform of the stored raw score) or ``"first"`` (the
    leading window, which equals truncate mode). In every mode the span is the one of the
    best-scoring window (the earliest on ties), the part a caller would highlight or cite.
    Encodings without windows pass through unchanged.
    """
    pairs = encoded.pair_index
    if pairs is None or encoded.spans is None:
        return DocScores(row_scores, None)
    counts = np.bincount(pairs, minlength=n)
    if len(counts) != n or not counts.all():
        raise RuntimeError(f"window mapping does not cover the {n} documents exactly once")
    rows = np.arange(len(pairs))
    # Rows grouped by pair, best score first within each pair, earlier window on ties.
    order = np.lexsort((rows, -row_scores, pairs))
    leads = np.ones(len(order), dtype=bool)
    leads[1:] = pairs[order][1:] != pairs[order][:-1]
    best = np.empty(n, dtype=np.int64)
    best[pairs[order[leads]]] = order[leads]
    if how == "max":
        raw = row_scores[best]
    elif how == "first":  # a pair's windows are consecutive rows in document order
        raw = row_scores[np.unique(pairs, return_index=True)[1]]
    elif how == "mean":
        raw = np.bincount(pairs, weights=row_scores.astype(np.float64), minlength=n) / counts
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    return DocScores(np.ascontiguousarray(raw, dtype=np.float32), encoded.spans[best])
