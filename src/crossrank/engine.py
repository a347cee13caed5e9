"""The one scoring engine every front door (Python API, adapters, server, Ray) goes through.

A call flows: validate input -> look pairs up in the score cache (if any) -> tokenize the
misses in one batched call (one row per pair, or per document window in chunk mode) -> sort
by length and cut token-budgeted batches -> forward passes under ``torch.inference_mode`` ->
float32 row scores folded into one raw score per pair, in input order -> cache the new
scores -> optional sigmoid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossrank.batching import BatchObserver, MicroBatcher, plan_batches
from crossrank.cache import Cache, CacheStats, ScoreCache, open_cache
from crossrank.dispatch import chunk_sizes, run_on_devices, score_overlapped
from crossrank.fingerprint import model_identity
from crossrank.loading import load, resolve_device, resolve_dtype
from crossrank.longdoc import DocScores, LongDocs, aggregate
from crossrank.options import EngineOptions
from crossrank.packed import PackedOptions, choose_runner
from crossrank.result import RerankResult
from crossrank.runners import Pending, Runner
from crossrank.tokenization import EncodedPairs, PairTokenizer
from crossrank.validation import (
    check_documents,
    check_optional_positive_int,
    check_pairs,
    check_query,
    check_top_n,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"

# Tokens per forward pass (padding included). CPU passes gain nothing from being large;
# on CUDA a larger pass keeps the GPU busy and stays far from memory limits for a
# 24-layer, 1024-wide model.
_DEFAULT_BATCH_TOKENS = {"cpu": 8192, "mps": 16384, "cuda": 65536}
# With a packed runner a call of more than _OVERLAP_MIN_PAIRS pairs is tokenized chunk by chunk
# (the first chunk small, later ones up to _OVERLAP_PAIRS pairs) while the GPU scores the
# chunks already queued. On one H200 a 1x50 call split 12 + 38 took 14.9-15.0 ms p50 against
# 15.2-15.4 ms in one pass; smaller calls gain nothing (benchmarks/gpu_peers.py).
_OVERLAP_MIN_PAIRS = 32
_FIRST_CHUNK = 12
_OVERLAP_PAIRS = 256


@dataclass(frozen=True)
class _Job:
    """A call's pairs after the cache lookup: the misses to score and what the cache had."""

    misses: np.ndarray  # indices of the pairs the model must score
    encoded: EncodedPairs  # rows of the misses (one per pair, or per window)
    keys: list[str] | None = None  # cache keys of all pairs, when a cache is set
    cached: DocScores | None = None  # cache values of all pairs (hits only are meaningful)


def check_options(**options: Any) -> LongDocs:
    """Check engine options without a model (see :class:`~crossrank.options.EngineOptions`);
    returns the long-document settings. Kept for the front doors until they build an
    ``EngineOptions`` themselves."""
    opts = EngineOptions.build(**options)
    return LongDocs(opts.long_docs, opts.chunk_tokens, opts.chunk_overlap, opts.aggregate)


class Reranker:
    """A cross-encoder reranker: load once, score many (query, document) pairs fast.

    Scores are ``float32`` in input order. With ``normalize=True`` (default) they are
    probabilities in [0, 1]: the sigmoid of the fp32 logit for one-logit models (the BGE
    rerankers), or the softmax probability of the positive label (index 1) for two-label
    models. With ``normalize=False`` the raw logit is returned (for two-label models, the
    difference ``logit[1] - logit[0]``, whose sigmoid is that same probability).

    Long documents: with ``long_docs="truncate"`` (default) a document is cut to the room
    ``max_length`` leaves after the query (capped at ``query_max_length`` tokens). With
    ``long_docs="chunk"`` a longer document is split into windows of ``chunk_tokens``
    document tokens (``None``: all that room) overlapping by ``chunk_overlap`` tokens
    (``None``: an eighth of the window); every window is scored in the same batches as the
    other pairs and the document's score is ``aggregate`` over its windows: ``"max"``
    (default), ``"mean"`` (of the raw logits) or ``"first"`` (the leading window, which
    equals truncate mode).
    :attr:`RerankResult.best_span` then gives the ``(start, end)`` character offsets of the
    best-scoring window in the document (``None`` in truncate mode).

    Score cache: ``cache="memory"`` keeps scores in an in-process LRU; a
    ``"redis://host:port/db"`` URL shares them between processes (entries expire after a
    day); any object with ``get_many``/``set_many`` (:class:`crossrank.cache.Cache`) works
    too. Only pairs missing from the cache reach the model, results are the same as without
    it, and if the cache server goes away scoring goes on without it (one warning is
    logged). :attr:`cache_stats` counts hits and misses.

    The instance is thread-safe and its async methods never block the event loop; concurrent
    async calls share forward passes through a micro-batching queue.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        options: EngineOptions | None = None,
        **overrides: Any,
    ) -> None:
        """``options`` (an :class:`~crossrank.options.EngineOptions`) and/or keyword
        ``overrides`` of it (every option's meaning is documented there)."""
        self.options = EngineOptions.build(options, **overrides)
        self._setup(model_name_or_path, **self.options.as_dict())

    def _setup(
        self,
        model_name_or_path: str,
        *,
        device: str | torch.device | Sequence[str | torch.device] = "auto",
        dtype: str | torch.dtype = "auto",
        max_length: int = 512,
        query_max_length: int | None = None,
        normalize: bool = True,
        batch_tokens: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        long_docs: str = "truncate",
        chunk_tokens: int | None = None,
        chunk_overlap: int | None = None,
        aggregate: str = "max",
        cache: str | Cache | None = None,
        fast_path: bool | PackedOptions | None = None,
        split_tokens: int = 16384,
        backend: str = "torch",
        quantize: bool = False,
        onnx_cache_dir: str | None = None,
    ) -> None:
        """``fast_path``: ``None`` picks the packed (padding-free) CUDA runner where it applies,
        ``False`` forces the padded reference runner, ``True`` or :class:`PackedOptions` forces
        the packed one. ``device`` may list several devices (``["cuda:0", "cuda:1"]``): one
        replica per device, and synchronous calls of at least ``split_tokens`` tokens are
        split across them."""
        devices = [device] if isinstance(device, (str, torch.device)) else list(device)
        if not devices:
            raise ValueError("device must be a device or a non-empty list of devices")
        device = devices[0]
        self.long_docs = check_options(
            max_length=max_length,
            query_max_length=query_max_length,
            batch_tokens=batch_tokens,
            long_docs=long_docs,
            chunk_tokens=chunk_tokens,
            chunk_overlap=chunk_overlap,
            aggregate=aggregate,
            cache=cache,
            backend=backend,
            quantize=quantize,
            split_tokens=split_tokens,
        )
        cache_backend = open_cache(cache)
        if backend == "onnx":
            # Imported here: onnxruntime is the optional extra crossrank[onnx]; the import
            # raises an ImportError naming it when it is missing.
            from crossrank import onnx_backend

            if device == "auto":
                device = "cpu"
            if dtype == "auto":
                dtype = "float32"
        if query_max_length is None:
            query_max_length = max_length * 3 // 4
        self.model_name = model_name_or_path
        self.revision = revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if backend == "onnx" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(
                "backend='onnx' runs on device='cpu' in float32 (quantize=True for int8), got "
                f"device={str(self.device)!r}, dtype={self.dtype}"
            )
        self.backend = backend
        self.quantize = bool(quantize)
        self.normalize = bool(normalize)
        self.batch_tokens = batch_tokens or _DEFAULT_BATCH_TOKENS.get(self.device.type, 8192)
        loaded = load(
            model_name_or_path,
            device=self.device,
            dtype=self.dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            weights=backend == "torch",
        )
        #: The torch model; ``None`` with ``backend="onnx"``, which never keeps the weights.
        self.model = loaded.model
        self.num_labels = loaded.num_labels
        model_max = getattr(loaded.config, "max_position_embeddings", None)
        if model_max is not None and getattr(loaded.config, "model_type", "") in (
            "xlm-roberta",
            "roberta",
            "camembert",
        ):
            model_max -= 2  # RoBERTa-style position ids start after the padding index
        if model_max is not None and max_length > model_max:
            raise ValueError(f"max_length={max_length} exceeds the model's limit of {model_max}")
        self.max_length = max_length
        self.tokenizer = PairTokenizer(
            loaded.tokenizer, max_length=max_length, query_max_length=query_max_length
        )
        self.query_max_length = query_max_length
        self.long_docs.check_room(
            max_length - query_max_length - self.tokenizer.special_tokens_in_pair
        )
        self._cache = (
            None
            if cache_backend is None
            else ScoreCache(
                cache_backend,
                self._cache_fingerprint(
                    model_identity(loaded.source, revision=revision, hub=loaded.hub)
                ),
                with_spans=self.long_docs.chunked,
            )
        )
        self.runner: Runner
        if backend == "onnx":
            self.runner = onnx_backend.build_runner(
                loaded, self.tokenizer, quantize=self.quantize, cache_dir=onnx_cache_dir
            )
        else:
            assert loaded.model is not None
            self.runner = choose_runner(loaded.model, self.device, self.tokenizer.pad_id, fast_path)
        self.split_tokens = split_tokens
        self._replicas = [
            Reranker(
                model_name_or_path,
                device=d,
                dtype=dtype,
                max_length=max_length,
                query_max_length=query_max_length,
                normalize=normalize,
                batch_tokens=batch_tokens,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                trust_remote_code=trust_remote_code,
                fast_path=fast_path,
            )
            for d in devices[1:]
        ]
        self._call_pool = ThreadPoolExecutor(
            max_workers=len(devices) + 1, thread_name_prefix="crossrank-call"
        )
        self._model_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-forward")
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MicroBatcher] = (
            weakref.WeakKeyDictionary()
        )
        self.batch_observer: BatchObserver | None = None

    def __repr__(self) -> str:
        return (
            f"Reranker({self.model_name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"max_length={self.max_length}, normalize={self.normalize}, "
            f"long_docs={self.long_docs.mode!r})"
        )

    @property
    def cache_stats(self) -> CacheStats | None:
        """Score-cache hit/miss/error counters since start (``None`` without a cache)."""
        return None if self._cache is None else self._cache.stats

    # ----------------------------------------------------------------- public sync API
    def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        normalize: bool | None = None,
        max_doc_tokens: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Score each document against ``query``; float32 array of shape ``(len(documents),)``.

        ``normalize`` overrides the instance setting for this call (``None`` keeps it).
        ``max_doc_tokens`` first cuts each document to that many tokens (``None``: only
        ``max_length``, or chunk mode, decides).
        """
        check_query(query)
        docs = check_documents(documents)
        check_optional_positive_int(max_doc_tokens, name="max_doc_tokens")
        scored = self._scores([query] * len(docs), docs, show_progress, max_doc_tokens)
        return self._finish(scored.raw, normalize)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Score ``[(query, document), ...]``; float32 array in input order."""
        queries, docs = check_pairs(pairs)
        return self._finish(self._scores(queries, docs, show_progress).raw, normalize)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        threshold: float | None = None,
        *,
        show_progress: bool = False,
    ) -> list[RerankResult]:
        """Rank ``documents`` for ``query``, best first.

        ``threshold`` keeps results whose score is ``>=`` it (normalized scores when
        ``normalize=True``); ``top_n`` is applied after it, and a ``top_n`` larger than the
        number of documents returns them all. In chunk mode each result's ``best_span`` is the
        character span of the document's best window.
        """
        top_n = check_top_n(top_n)
        docs = check_documents(documents)
        check_query(query)
        scored = self._scores([query] * len(docs), docs, show_progress)
        return self.to_results(
            docs,
            self._finish(scored.raw, None),
            spans=scored.spans,
            top_n=top_n,
            threshold=threshold,
        )

    # ---------------------------------------------------------------- public async API
    async def ascore(
        self,
        query: str,
        documents: Sequence[str],
        *,
        normalize: bool | None = None,
        max_doc_tokens: int | None = None,
    ) -> np.ndarray:
        """Async :meth:`score`: tokenization and forward passes run off the event loop, and
        concurrent calls are merged into shared forward passes."""
        raw, _ = await self.ascore_raw(query, documents, max_doc_tokens=max_doc_tokens)
        return self._finish(raw, normalize)

    async def ascore_raw(
        self, query: str, documents: Sequence[str], *, max_doc_tokens: int | None = None
    ) -> tuple[np.ndarray, int]:
        """Raw scores (input order) and the tokens the forward passes computed for them
        (pairs answered by the score cache cost none): what a server reports as usage.

        Raises :class:`~crossrank.batching.QueueFullError` when the queue holds its maximum
        of pending pairs; cancelling the awaiting task drops the pairs not yet sent to the
        model.
        """
        check_query(query)
        docs = check_documents(documents)
        check_optional_positive_int(max_doc_tokens, name="max_doc_tokens")
        scored, tokens = await self._ascores([query] * len(docs), docs, max_doc_tokens)
        return scored.raw, tokens

    async def ascore_pairs(
        self, pairs: Sequence[tuple[str, str]], *, normalize: bool | None = None
    ) -> np.ndarray:
        """Async :meth:`score_pairs`."""
        queries, docs = check_pairs(pairs)
        return self._finish((await self._ascores(queries, docs))[0].raw, normalize)

    async def arerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        threshold: float | None = None,
    ) -> list[RerankResult]:
        """Async :meth:`rerank`."""
        top_n = check_top_n(top_n)
        docs = check_documents(documents)
        check_query(query)
        scored, _ = await self._ascores([query] * len(docs), docs)
        return self.to_results(
            docs,
            self._finish(scored.raw, None),
            spans=scored.spans,
            top_n=top_n,
            threshold=threshold,
        )

    # ------------------------------------------------------------------ building blocks
    @staticmethod
    def to_results(
        documents: Sequence[str],
        scores: np.ndarray,
        *,
        spans: np.ndarray | None = None,
        top_n: int | None = None,
        threshold: float | None = None,
    ) -> list[RerankResult]:
        """Turn scores (and chunk-mode ``spans``, shape ``(n, 2)``) into
        :class:`RerankResult` s, best first (ties keep input order)."""
        order = np.argsort(-scores, kind="stable")
        if threshold is not None:
            order = order[scores[order] >= threshold]
        if top_n is not None:
            order = order[:top_n]
        results = [RerankResult(int(i), float(scores[i]), documents[i]) for i in order]
        if spans is None:
            return results
        return [
            replace(result, best_span=(int(spans[i, 0]), int(spans[i, 1])))
            for result, i in zip(results, order, strict=True)
        ]

    def encode(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPairs:
        """Tokenize validated pairs (one batched fast-tokenizer call).

        In chunk mode a long document gives several rows (its windows), mapped back to their
        pair by ``pair_index``; fold row scores with :func:`crossrank.longdoc.aggregate`.
        """
        if self.long_docs.chunked:
            return self.tokenizer.encode_windows(
                queries,
                documents,
                window_tokens=self.long_docs.chunk_tokens,
                overlap=self.long_docs.chunk_overlap,
            )
        return self.tokenizer.encode(queries, documents)

    def batcher(self, max_pending_pairs: int | None = None) -> MicroBatcher:
        """The micro-batching queue of the running event loop (created on first use).

        A ``max_pending_pairs`` given here becomes the queue's limit (beyond it
        :meth:`MicroBatcher.submit` raises ``QueueFullError``), also for a queue that exists.
        """
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is not None and max_pending_pairs is not None:
            batcher.max_pending_pairs = max_pending_pairs
        if batcher is None:
            batcher = MicroBatcher(
                self.forward,
                batch_tokens=self.batch_tokens,
                packed=self.runner.packed,
                executor=self._executor,
                max_pending_pairs=max_pending_pairs,
                observer=self._observe,
            )
            self._batchers[loop] = batcher
        return batcher

    def forward(self, encoded: EncodedPairs) -> np.ndarray:
        """Raw float32 scores of every pair in ``encoded``, in one forward pass.

        On CUDA out-of-memory the pass is split in halves and retried; a pair that alone does
        not fit raises a ``RuntimeError`` saying so.
        """
        return self._submit(encoded)()

    def warmup(self) -> None:
        """Run one tiny forward pass so the first real request pays no start-up cost."""
        self.score("warm up", ["crossrank"])

    def close(self) -> None:
        """Stop the worker threads (of the replicas too)."""
        self._executor.shutdown(wait=True)
        self._call_pool.shutdown(wait=True)
        for replica in self._replicas:
            replica.close()

    # -------------------------------------------------------------------- internals
    def _observe(self, pairs: int, tokens: int) -> None:
        if self.batch_observer is not None:
            self.batch_observer(pairs, tokens)

    def _submit(self, encoded: EncodedPairs) -> Pending:
        """Queue one forward pass (see :meth:`forward`); the result gives raw scores.

        CUDA allocates while kernels are queued, so out-of-memory surfaces here, before any
        waiting; the failed pass is split in halves, each queued the same way.
        """
        try:
            with self._model_lock:
                logits = self.runner.submit(encoded)
        except torch.cuda.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(encoded) == 1:
                raise RuntimeError(
                    f"out of memory scoring a single pair of {int(encoded.lengths[0])} tokens on "
                    f"{self.device}; lower max_length or use a device with more memory"
                ) from None
            half = len(encoded) // 2
            logger.warning("out of memory on %d pairs; retrying in halves", len(encoded))
            rows = np.arange(len(encoded))
            first, second = (
                self._submit(encoded.take(part)) for part in (rows[:half], rows[half:])
            )
            return lambda: np.concatenate([first(), second()])
        return lambda: self._raw_scores(logits())

    def _raw_scores(self, logits: np.ndarray) -> np.ndarray:
        raw = logits[:, 1] - logits[:, 0] if self.num_labels == 2 else logits[:, 0]
        return np.ascontiguousarray(raw, dtype=np.float32)

    def _score_texts(
        self, queries: list[str], documents: list[str], show_progress: bool
    ) -> np.ndarray:
        if self.runner.packed and len(documents) > _OVERLAP_MIN_PAIRS and not show_progress:
            sizes = chunk_sizes(len(documents), _FIRST_CHUNK, _OVERLAP_PAIRS)
            return score_overlapped(
                self.encode, self._submit_encoded, queries, documents, sizes, self._call_pool
            )
        return self._score_encoded(self.encode(queries, documents), show_progress)

    def _score_encoded(self, encoded: EncodedPairs, show_progress: bool = False) -> np.ndarray:
        if show_progress and not self._spreads(encoded):
            # the bar counts finished passes: wait for each in turn
            out = np.empty(len(encoded), dtype=np.float32)
            batches = plan_batches(encoded.lengths, self.batch_tokens, packed=self.runner.packed)
            for rows in tqdm(batches, desc="scoring", unit="batch"):
                out[rows] = self.forward(encoded.take(rows))
            return out
        return self._submit_encoded(encoded)()

    def _spreads(self, encoded: EncodedPairs) -> bool:
        """Whether ``encoded`` is large enough to be spread over several devices."""
        return bool(self._replicas) and encoded.total_tokens >= self.split_tokens

    def _submit_encoded(self, encoded: EncodedPairs) -> Pending:
        """Queue every pass of ``encoded`` (token-budgeted batches; spread over the devices
        when the call is large enough); the result gives scores in ``encoded`` order."""
        packed = self.runner.packed
        if self._spreads(encoded):
            budget = min(self.batch_tokens, -(-encoded.total_tokens // (len(self._replicas) + 1)))
            budget = max(budget, int(encoded.lengths.max()))
            batches = plan_batches(encoded.lengths, budget, packed=packed)
            submits = [self._submit, *(r._submit for r in self._replicas)]
            scores = run_on_devices(submits, encoded, batches, self._call_pool)
            return lambda: scores
        batches = plan_batches(encoded.lengths, self.batch_tokens, packed=packed)
        queued = [(rows, self._submit(encoded.take(rows))) for rows in batches]

        def result() -> np.ndarray:
            out = np.empty(len(encoded), dtype=np.float32)
            for rows, pending in queued:
                out[rows] = pending()
            return out

        return result

    def _scores(
        self,
        queries: list[str],
        documents: list[str],
        show_progress: bool = False,
        max_doc_tokens: int | None = None,
    ) -> DocScores:
        if self._cache is None and not self.long_docs.chunked and max_doc_tokens is None:
            # the common path: one score per pair, tokenization overlapped with the GPU
            return DocScores(self._score_texts(queries, documents, show_progress), None)
        job = self._prepare(queries, documents, max_doc_tokens)
        return self._complete(job, self._score_encoded(job.encoded, show_progress))

    async def _ascores(
        self, queries: list[str], documents: list[str], max_doc_tokens: int | None = None
    ) -> tuple[DocScores, int]:
        """Scores and the tokens computed for them."""
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, self._prepare, queries, documents, max_doc_tokens)
        rows = await self.batcher().submit(job.encoded)
        if self._cache is None:
            return self._complete(job, rows), job.encoded.total_tokens
        scored = await loop.run_in_executor(None, self._complete, job, rows)  # cache I/O
        return scored, job.encoded.total_tokens

    def _prepare(
        self, queries: list[str], documents: list[str], max_doc_tokens: int | None = None
    ) -> _Job:
        """Look the pairs up in the cache and tokenize the misses (runs off the event loop)."""
        if max_doc_tokens is not None and documents:
            documents = self.tokenizer.cap_documents(documents, max_doc_tokens)
        if self._cache is None:
            misses = np.arange(len(documents))
            return _Job(misses, self.encode(queries, documents))
        keys = self._cache.keys(queries, documents)
        hit, raw, spans = self._cache.get(keys)
        misses = np.flatnonzero(~hit)
        encoded = self.encode([queries[i] for i in misses], [documents[i] for i in misses])
        return _Job(misses, encoded, keys, DocScores(raw, spans))

    def _complete(self, job: _Job, rows: np.ndarray) -> DocScores:
        """Fold row scores into per-pair scores, merged with cache hits and stored."""
        fresh = aggregate(rows, job.encoded, len(job.misses), self.long_docs.aggregate)
        if self._cache is None or job.keys is None or job.cached is None:
            return fresh
        raw, spans = job.cached.raw, job.cached.spans  # fresh arrays owned by this call
        raw[job.misses] = fresh.raw
        if spans is not None and fresh.spans is not None:
            spans[job.misses] = fresh.spans
        if len(job.misses):
            self._cache.put([job.keys[i] for i in job.misses], fresh.raw, fresh.spans)
        return DocScores(raw, spans)

    def _cache_fingerprint(self, identity: dict[str, str]) -> str:
        """Everything besides the pair that changes a raw score (``normalize`` does not);
        ``identity`` is the model's :func:`~crossrank.fingerprint.model_identity`."""
        return "|".join(
            [
                "crossrank-v3",
                json.dumps(identity, sort_keys=True),
                str(self.revision),
                str(self.dtype),
                f"{self.backend}{'-int8' if self.quantize else ''}",
                str(self.max_length),
                str(self.query_max_length),
                self.long_docs.fingerprint(),
            ]
        )

    @staticmethod
    def sigmoid(raw: np.ndarray) -> np.ndarray:
        """Normalized scores from raw ones: the probability described in the class docstring."""
        return torch.sigmoid(torch.from_numpy(raw)).numpy().astype(np.float32, copy=False)

    def _finish(self, raw: np.ndarray, normalize: bool | None) -> np.ndarray:
        return self.sigmoid(raw) if (self.normalize if normalize is None else normalize) else raw
