"""The one scoring engine every front door (Python API, adapters, server, Ray) goes through.

A call flows: validate input -> look pairs up in the score cache (if any) -> tokenize the
misses in one batched call (one row per pair, or per document window in chunk mode) -> sort
by length and cut token-budgeted batches -> forward passes under ``torch.inference_mode`` ->
float32 row scores folded into one raw score per pair, in input order -> cache the new
scores -> optional sigmoid.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from crossrank.backends import Runner, SelfCheck, build_workers, compute_dtype, resolve_devices
from crossrank.backends.decoder import detect_family
from crossrank.backends.families import pair_lengths
from crossrank.backends.setup import (
    DECODER_ARCHITECTURES,
    default_batch_tokens,
    pair_tokenizer,
    score_cache,
    with_weights,
)
from crossrank.backends.workers import (
    MOST_AHEAD,
    DevicePool,
    overlap_sizes,
    score_overlapped,
)
from crossrank.batching import BatchObserver, MicroBatcher, Observers, plan_batches
from crossrank.cache import CacheStats, open_cache
from crossrank.jobs import Jobs
from crossrank.loading import load
from crossrank.longdoc import DocScores, LongDocs
from crossrank.options import DEFAULT_MODEL, EngineOptions, args_docstring
from crossrank.peer_api import PeerCompat
from crossrank.result import RerankResult, sigmoid, to_results
from crossrank.tokenization import EncodedPairs
from crossrank.validation import check_pairs, check_rerank_args, check_score_args

logger = logging.getLogger(__name__)


class Reranker(PeerCompat):
    """A cross-encoder reranker: load once, score many (query, document) pairs fast.

    Scores are ``float32`` in input order. With ``normalize=True`` (default) they are
    probabilities in [0, 1]: the sigmoid of the fp32 logit for one-logit models (the BGE
    rerankers), or the softmax probability of the positive label (index 1) for two-label
    models. With ``normalize=False`` the raw logit is returned (for two-label models, the
    difference ``logit[1] - logit[0]``, whose sigmoid is that same probability).

    Decoder (LLM) rerankers (Qwen3-Reranker, bge-reranker-v2-gemma) are detected from the
    config and scored from their answer-token logits (``docs/llm-rerankers.md``). Every
    scoring method takes ``instruction=``: for a decoder, the task instruction of this call's
    prompts (``None``: the engine's ``instruction`` option), scored and cached exactly as by
    an engine built with it (with this engine's ``query_max_length``); for an encoder, or an
    instruction that leaves no room for the document, an
    :class:`~crossrank.errors.OptionError` naming ``instruction``. Long
    documents (``long_docs="chunk"``: every window scored, ``RerankResult.best_span`` the best
    window's characters), the score cache and every other option are described once, in
    the ``Args`` of ``__init__`` (:class:`~crossrank.options.EngineOptions`).

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
        ``overrides`` of it (every option's meaning is documented there). ``device`` may list
        several devices (``["cuda:0", "cuda:1"]``): one worker per device, and synchronous
        calls of at least ``split_tokens`` tokens are split across them. Options that need
        the model (``max_length`` against its positions, ``chunk_overlap`` against the room a
        query leaves) raise :class:`~crossrank.errors.OptionError` here."""
        self.options = opts = EngineOptions.build(options, **overrides)
        self.model_name, self.revision = model_name_or_path, opts.revision
        self.backend, self.quantize, self.normalize = opts.backend, opts.quantize, opts.normalize
        self.long_docs = LongDocs.from_options(opts)
        self.split_tokens = opts.split_tokens
        cache_backend = open_cache(opts.cache)
        devices = resolve_devices(opts)
        self.device = devices[0]
        loaded = load(
            model_name_or_path,
            device=self.device,
            dtype=compute_dtype(opts, self.device),
            revision=opts.revision,
            cache_dir=opts.cache_dir,
            local_files_only=opts.local_files_only,
            trust_remote_code=opts.trust_remote_code,
            weights=False,
            causal_architectures=DECODER_ARCHITECTURES,
        )
        #: The decoder (LLM) reranker family, ``None`` for an encoder cross-encoder.
        self.family = detect_family(loaded.config, loaded.tokenizer, name=opts.family)
        loaded, self.dtype = with_weights(loaded, self.family, opts, self.device)
        #: The torch model; ``None`` with ``backend="onnx"``, which never keeps the weights.
        self.model = loaded.model
        self.num_labels = loaded.num_labels
        self.batch_tokens = opts.batch_tokens or default_batch_tokens(
            loaded.config, self.family, self.device
        )
        self.max_length, query_max_length = pair_lengths(loaded.config, opts)
        self.tokenizer = pair_tokenizer(
            loaded, self.family, opts, self.max_length, query_max_length
        )
        self.query_max_length = self.tokenizer.query_max_length
        self.long_docs.check_room(
            self.max_length - self.query_max_length - self.tokenizer.special_tokens_in_pair
        )
        cache = score_cache(cache_backend, loaded, opts, self.dtype, self.tokenizer)
        self._jobs = Jobs(self.tokenizer, self.long_docs, cache)
        # a thread per device (a call spread over them) and per chunk tokenized ahead
        self._call_pool = ThreadPoolExecutor(
            max_workers=len(devices) + MOST_AHEAD, thread_name_prefix="crossrank-call"
        )
        workers = build_workers(loaded, devices, self.tokenizer, opts)
        self._devices = DevicePool(workers, opts.split_tokens, self._call_pool)
        #: The main device's runner (the other devices' runners are in their workers).
        self.runner: Runner = workers[0].runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-forward")
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MicroBatcher] = (
            weakref.WeakKeyDictionary()
        )
        self._observers = Observers()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Reranker({self.model_name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"max_length={self.max_length}, normalize={self.normalize}, "
            f"long_docs={self.long_docs.mode!r})"
        )

    @property
    def cache_stats(self) -> CacheStats | None:
        """Score-cache hit/miss/error counters since start (``None`` without a cache)."""
        return None if self._jobs.cache is None else self._jobs.cache.stats

    @property
    def self_check(self) -> SelfCheck | None:
        """The fast runner's check against the reference on the loaded weights (``None`` when
        the reference runner was chosen or ``self_check=False``): :mod:`crossrank.backends.selfcheck`."""
        return self._devices.self_check

    @property
    def rescored_batches(self) -> int:
        """float16/bfloat16 passes with non-finite logits that were rescored in float32."""
        return self._devices.rescored_batches

    # ----------------------------------------------------------------- public sync API
    def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        normalize: bool | None = None,
        max_doc_tokens: int | None = None,
        show_progress: bool = False,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Score each document against ``query``; float32 array of shape ``(len(documents),)``.

        ``normalize`` overrides the instance setting for this call (``None`` keeps it).
        ``max_doc_tokens`` first cuts each document to that many tokens (``None``: only
        ``max_length``, or chunk mode, decides). ``instruction``: see the class docstring.
        """
        docs = check_score_args(query, documents, max_doc_tokens)
        instruction = self.tokenizer.check_instruction(instruction)
        scored = self._scores([query] * len(docs), docs, show_progress, max_doc_tokens, instruction)
        return self._finish(scored.raw, normalize)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool | None = None,
        show_progress: bool = False,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Score ``[(query, document), ...]``; float32 array in input order."""
        queries, docs = check_pairs(pairs)
        instruction = self.tokenizer.check_instruction(instruction)
        scored = self._scores(queries, docs, show_progress, instruction=instruction)
        return self._finish(scored.raw, normalize)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        threshold: float | None = None,
        *,
        show_progress: bool = False,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Rank ``documents`` for ``query``, best first.

        ``threshold`` keeps results whose score is ``>=`` it (normalized scores when
        ``normalize=True``); ``top_n`` is applied after it, and a ``top_n`` larger than the
        number of documents returns them all. In chunk mode each result's ``best_span`` is the
        character span of the document's best window.
        """
        docs, top_n, threshold = check_rerank_args(query, documents, top_n, threshold)
        instruction = self.tokenizer.check_instruction(instruction)
        scored = self._scores([query] * len(docs), docs, show_progress, instruction=instruction)
        return self._ranked(docs, scored, top_n, threshold)

    # ---------------------------------------------------------------- public async API
    async def ascore(
        self,
        query: str,
        documents: Sequence[str],
        *,
        normalize: bool | None = None,
        max_doc_tokens: int | None = None,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Async :meth:`score`: tokenization and forward passes run off the event loop, and
        concurrent calls are merged into shared forward passes (whatever their instruction)."""
        raw, _ = await self.ascore_raw(
            query, documents, max_doc_tokens=max_doc_tokens, instruction=instruction
        )
        return self._finish(raw, normalize)

    async def ascore_raw(
        self,
        query: str,
        documents: Sequence[str],
        *,
        max_doc_tokens: int | None = None,
        instruction: str | None = None,
    ) -> tuple[np.ndarray, int]:
        """Raw scores (input order) and the tokens the forward passes computed for them
        (pairs answered by the score cache cost none): what a server reports as usage.

        Raises :class:`~crossrank.errors.QueueFullError` when the queue holds its maximum
        of pending pairs; cancelling the awaiting task drops the pairs not yet sent to the
        model.
        """
        docs = check_score_args(query, documents, max_doc_tokens)
        instruction = self.tokenizer.check_instruction(instruction)
        queries = [query] * len(docs)
        scored, tokens = await self._ascores(queries, docs, max_doc_tokens, instruction)
        return scored.raw, tokens

    async def ascore_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool | None = None,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Async :meth:`score_pairs`."""
        queries, docs = check_pairs(pairs)
        instruction = self.tokenizer.check_instruction(instruction)
        scored, _ = await self._ascores(queries, docs, instruction=instruction)
        return self._finish(scored.raw, normalize)

    async def arerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        threshold: float | None = None,
        *,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Async :meth:`rerank`."""
        docs, top_n, threshold = check_rerank_args(query, documents, top_n, threshold)
        instruction = self.tokenizer.check_instruction(instruction)
        scored, _ = await self._ascores([query] * len(docs), docs, instruction=instruction)
        return self._ranked(docs, scored, top_n, threshold)

    # ------------------------------------------------------------- server interface
    def first_overlong(
        self, query: str, texts: Sequence[str], *, instruction: str | None = None
    ) -> int | None:
        """The index of the first text whose pair with ``query`` (and a decoder prompt's
        ``instruction``) would be cut to fit ``max_length`` (``None`` when every pair fits):
        the check behind a server's "do not truncate" option. In chunk mode long texts are
        scored window by window, never cut, so only the query is checked. A query over
        ``query_max_length`` tokens (it would be cut in every pair) raises a ``ValueError``
        saying so."""
        docs = check_score_args(query, texts)
        tok = self.tokenizer
        fixed = tok.template_tokens(tok.check_instruction(instruction))
        texts_to_count = [query] if self.long_docs.chunked else [query, *docs]
        counts = tok.token_counts(texts_to_count, at_most=tok.max_length)  # bounded work
        if counts[0] > tok.query_max_length:
            raise ValueError(f"query has more than the limit of {tok.query_max_length} tokens")
        over = np.flatnonzero(counts[0] + counts[1:] + fixed > tok.max_length)
        return int(over[0]) if len(over) else None

    def subscribe(self, observer: BatchObserver) -> Callable[[], None]:
        """Call ``observer(pairs, tokens)`` after every forward pass of the async path (a
        server's metrics); returns the function that unsubscribes it (safe to call twice)."""
        return self._observers.subscribe(observer)

    # ------------------------------------------------------------------ building blocks
    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        cancel: threading.Event | None = None,
        *,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """Tokenize validated pairs (batched fast-tokenizer calls on crossrank's threads;
        ``cancel`` stops it between chunks with ``concurrent.futures.CancelledError``), with
        a decoder prompt's ``instruction`` (``None``: the engine's).

        In chunk mode a long document gives several rows (its windows, the first
        ``max_windows``), mapped back to their pair by ``pair_index``; fold row scores with
        :func:`crossrank.longdoc.aggregate`.
        """
        return self.long_docs.encode(self.tokenizer, queries, documents, cancel, instruction)

    def batcher(self, max_pending_pairs: int | None = None) -> MicroBatcher:
        """The micro-batching queue of the running event loop (created on first use): the
        building block a server uses to bound its queue and read its depth.

        A ``max_pending_pairs`` given here becomes the queue's limit (beyond it
        :meth:`MicroBatcher.submit` raises ``QueueFullError``), also for a queue that exists.
        After :meth:`close` it raises a ``RuntimeError``.
        """
        if self._closed:  # a queue may queue passes from any thread: refuse here, not there
            raise RuntimeError("cannot schedule new scoring after shutdown (Reranker.close)")
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is not None and max_pending_pairs is not None:
            batcher.max_pending_pairs = max_pending_pairs
        if batcher is None:
            batcher = MicroBatcher(
                submit=self._devices.workers[0].submit,
                batch_tokens=self.batch_tokens,
                packed=self.runner.packed,
                executor=self._executor,
                max_pending_pairs=max_pending_pairs,
                observer=self._observers,
            )
            self._batchers[loop] = batcher
        return batcher

    def forward(self, encoded: EncodedPairs) -> np.ndarray:
        """Raw float32 scores of every pair in ``encoded``, in one forward pass on the main
        device: the building block the micro-batching queue and the benchmarks call.

        On CUDA out-of-memory the pass is split in halves and retried; a pair that alone does
        not fit raises a ``RuntimeError`` saying so.
        """
        return self._devices.workers[0].submit(encoded)()

    def warmup(self) -> None:
        """Run one tiny forward pass so the first real request pays no start-up cost."""
        self.score("warm up", ["crossrank"])

    def close(self) -> None:
        """Stop the worker threads (the micro-batching queues' too)."""
        self._closed = True
        for batcher in list(self._batchers.values()):
            batcher.close()
        self._executor.shutdown(wait=True)
        self._call_pool.shutdown(wait=True)

    # -------------------------------------------------------------------- internals
    def _score_texts(
        self,
        queries: list[str],
        documents: list[str],
        show_progress: bool,
        instruction: str | None,
    ) -> np.ndarray:
        encode = partial(self.encode, instruction=instruction)
        sizes = overlap_sizes(len(documents), self.options, packed=self.runner.packed)
        if sizes is not None and not show_progress:
            return score_overlapped(
                encode, self._submit_encoded, queries, documents, sizes, self._call_pool
            )
        return self._score_encoded(encode(queries, documents), show_progress)

    def _score_encoded(self, encoded: EncodedPairs, show_progress: bool = False) -> np.ndarray:
        if show_progress and not self._devices.spreads(encoded):
            # the bar counts finished passes: wait for each in turn
            out = np.empty(len(encoded), dtype=np.float32)
            batches = plan_batches(encoded.lengths, self.batch_tokens, packed=self.runner.packed)
            for rows in tqdm(batches, desc="scoring", unit="batch"):
                out[rows] = self.forward(encoded.take(rows))
            return out
        return self._submit_encoded(encoded)()

    def _submit_encoded(self, encoded: EncodedPairs) -> Callable[[], np.ndarray]:
        """Queue every pass of ``encoded`` (on one device, or spread over several)."""
        return self._devices.submit(encoded, self.batch_tokens)

    def _scores(
        self,
        queries: list[str],
        documents: list[str],
        show_progress: bool = False,
        max_doc_tokens: int | None = None,
        instruction: str | None = None,
    ) -> DocScores:
        """Raw scores of checked pairs (``instruction`` checked too: ``None`` for the engine's)."""
        if not self._jobs.needed(max_doc_tokens):
            # the common path: one score per pair, tokenization overlapped with the GPU
            raw = self._score_texts(queries, documents, show_progress, instruction)
            return DocScores(raw, None)
        job = self._jobs.prepare(queries, documents, max_doc_tokens, instruction=instruction)
        return self._jobs.complete(job, self._score_encoded(job.encoded, show_progress))

    async def _ascores(
        self,
        queries: list[str],
        documents: list[str],
        max_doc_tokens: int | None = None,
        instruction: str | None = None,
    ) -> tuple[DocScores, int]:
        """Scores and the tokens computed for them. Cancelling the caller stops its
        tokenization between chunks and drops its pairs not yet sent to the model."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        try:
            if not self._jobs.needed(max_doc_tokens):
                return await self._ascores_overlapped(queries, documents, cancel, instruction)
            job = await loop.run_in_executor(
                None, self._jobs.prepare, queries, documents, max_doc_tokens, cancel, instruction
            )
            rows = await self.batcher().submit(job.encoded)
        except BaseException:
            cancel.set()
            raise
        if self._jobs.cache is None:
            return self._jobs.complete(job, rows), job.encoded.total_tokens
        scored = await loop.run_in_executor(None, self._jobs.complete, job, rows)  # cache I/O
        return scored, job.encoded.total_tokens

    async def _ascores_overlapped(
        self,
        queries: list[str],
        documents: list[str],
        cancel: threading.Event,
        instruction: str | None,
    ) -> tuple[DocScores, int]:
        """The common async path, as :meth:`_score_texts`: a small first chunk is queued
        while the rest is tokenized."""
        tokens = [0]

        def encode(lo: int, hi: int) -> EncodedPairs:
            encoded = self.encode(queries[lo:hi], documents[lo:hi], cancel, instruction=instruction)
            tokens[0] += encoded.total_tokens
            return encoded

        n = len(documents)
        sizes = overlap_sizes(n, self.options, packed=self.runner.packed)
        raw = await self.batcher().submit_overlapped(encode, [n] if sizes is None else sizes)
        return DocScores(raw, None), tokens[0]

    def _ranked(
        self, docs: list[str], scored: DocScores, top_n: int | None, threshold: float | None
    ) -> list[RerankResult]:
        normalized = self._finish(scored.raw, None)
        return to_results(docs, normalized, spans=scored.spans, top_n=top_n, threshold=threshold)

    def _finish(self, raw: np.ndarray, normalize: bool | None) -> np.ndarray:
        return sigmoid(raw) if (self.normalize if normalize is None else normalize) else raw


# The Args of every engine option, generated from their one declaration (crossrank.options).
Reranker.__init__.__doc__ = f"{Reranker.__init__.__doc__}\n\n{args_docstring()}\n"
