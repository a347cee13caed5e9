"""What happens to a call's pairs before and after the model, when the call needs more than
one row per pair.

The common call (no score cache, truncate mode, no per-call document cap) sends one row per
pair to the model, its tokenization overlapped with the passes
(:func:`crossrank.backends.workers.score_overlapped`). Any other call becomes a :class:`Job`:
:meth:`Jobs.prepare` cuts the documents to ``max_doc_tokens``, looks the pairs up in the
score cache and tokenizes only the misses (one row per pair, or per window in chunk mode);
:meth:`Jobs.complete` folds the model's row scores into one raw score per pair
(:func:`crossrank.longdoc.aggregate`), merges them with the cache's hits and stores the fresh
ones. Both are plain bookkeeping around the forward passes, kept out of
:class:`crossrank.Reranker`, which only orchestrates; ``prepare`` does the tokenizing and the
cache I/O, so the async path runs it off the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

import numpy as np

from crossrank.cache import ScoreCache
from crossrank.longdoc import DocScores, LongDocs, aggregate
from crossrank.tokenization import EncodedPairs, PairTokenizer


@dataclass(frozen=True)
class Job:
    """A call's pairs after the cache lookup: the misses to score and what the cache had."""

    misses: np.ndarray  # indices of the pairs the model must score
    encoded: EncodedPairs  # rows of the misses (one per pair, or per window)
    keys: list[str] | None = None  # cache keys of all pairs, when a cache is set
    cached: DocScores | None = None  # cache values of all pairs (hits only are meaningful)


class Jobs:
    """Prepares calls' pairs for the model and completes them from its row scores, with
    ``tokenizer``, the ``long_docs`` settings and an optional score ``cache``."""

    def __init__(
        self, tokenizer: PairTokenizer, long_docs: LongDocs, cache: ScoreCache | None
    ) -> None:
        self.tokenizer, self.long_docs, self.cache = tokenizer, long_docs, cache

    def needed(self, max_doc_tokens: int | None) -> bool:
        """Whether a call goes through a :class:`Job`: with a score cache, in chunk mode, or
        with a per-call document cap."""
        return self.cache is not None or self.long_docs.chunked or max_doc_tokens is not None

    def prepare(
        self,
        queries: list[str],
        documents: list[str],
        max_doc_tokens: int | None = None,
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> Job:
        """Look the pairs up in the cache and tokenize the misses (runs off the event loop);
        ``instruction`` is a decoder prompt's for this call (``None``: the engine's)."""
        if max_doc_tokens is not None and documents:
            documents = self.tokenizer.cap_documents(documents, max_doc_tokens)
        encode = partial(
            self.long_docs.encode, self.tokenizer, cancel=cancel, instruction=instruction
        )
        if self.cache is None:
            return Job(np.arange(len(documents)), encode(queries, documents))
        keys = self.cache.keys(queries, documents, instruction)
        hit, raw, spans = self.cache.get(keys)
        misses = np.flatnonzero(~hit)
        encoded = encode([queries[i] for i in misses], [documents[i] for i in misses])
        return Job(misses, encoded, keys, DocScores(raw, spans))

    def complete(self, job: Job, rows: np.ndarray) -> DocScores:
        """Fold row scores into per-pair scores, merged with cache hits and stored."""
        fresh = aggregate(rows, job.encoded, len(job.misses), self.long_docs.aggregate)
        if self.cache is None or job.keys is None or job.cached is None:
            return fresh
        raw, spans = job.cached.raw, job.cached.spans  # fresh arrays owned by this call
        raw[job.misses] = fresh.raw
        if spans is not None and fresh.spans is not None:
            spans[job.misses] = fresh.spans
        if len(job.misses):
            self.cache.put([job.keys[i] for i in job.misses], fresh.raw, fresh.spans)
        return DocScores(raw, spans)
