"""The one scoring engine every front door (Python API, adapters, server, Ray) goes through.

A call flows: validate input -> tokenize all pairs in one batched call -> sort by length and
cut token-budgeted batches -> forward passes under ``torch.inference_mode`` -> float32 scores
written back in input order -> optional sigmoid.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from crossrank.batching import BatchObserver, MicroBatcher, plan_batches
from crossrank.dispatch import chunk_sizes, run_on_devices, score_overlapped
from crossrank.loading import load, resolve_device, resolve_dtype
from crossrank.packed import PackedOptions, choose_runner
from crossrank.result import RerankResult
from crossrank.runners import Runner
from crossrank.tokenization import EncodedPairs, PairTokenizer
from crossrank.validation import check_documents, check_pairs, check_query, check_top_n

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"

# Tokens per forward pass (padding included). CPU passes gain nothing from being large;
# on CUDA a larger pass keeps the GPU busy and stays far from memory limits for a
# 24-layer, 1024-wide model.
_DEFAULT_BATCH_TOKENS = {"cpu": 8192, "mps": 16384, "cuda": 65536}
# With a packed runner a call of more than _OVERLAP_MIN_PAIRS pairs is tokenized chunk by chunk
# (the first chunk small, later ones up to _OVERLAP_PAIRS pairs) while the GPU scores the
# previous chunk; smaller calls are faster in one pass (measured: benchmarks/gpu_peers.py).
_OVERLAP_MIN_PAIRS = 128
_FIRST_CHUNK = 16
_OVERLAP_PAIRS = 256


class Reranker:
    """A cross-encoder reranker: load once, score many (query, document) pairs fast.

    Scores are ``float32`` in input order. With ``normalize=True`` (default) they are
    probabilities in [0, 1]: the sigmoid of the fp32 logit for one-logit models (the BGE
    rerankers), or the softmax probability of the positive label (index 1) for two-label
    models. With ``normalize=False`` the raw logit is returned (for two-label models, the
    difference ``logit[1] - logit[0]``, whose sigmoid is that same probability).

    The instance is thread-safe and its async methods never block the event loop; concurrent
    async calls share forward passes through a micro-batching queue.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
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
        fast_path: bool | PackedOptions | None = None,
        split_tokens: int = 16384,
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
        if isinstance(split_tokens, bool) or not isinstance(split_tokens, int) or split_tokens < 1:
            raise ValueError(f"split_tokens must be a positive int, got {split_tokens!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
            raise ValueError(f"max_length must be an int >= 8, got {max_length!r}")
        if query_max_length is None:
            query_max_length = max_length * 3 // 4
        if not isinstance(query_max_length, int) or query_max_length < 1:
            raise ValueError(f"query_max_length must be a positive int, got {query_max_length!r}")
        self.model_name = model_name_or_path
        self.revision = revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.normalize = bool(normalize)
        self.batch_tokens = int(batch_tokens or _DEFAULT_BATCH_TOKENS.get(self.device.type, 8192))
        if self.batch_tokens < max_length:
            raise ValueError(f"batch_tokens={self.batch_tokens} must be >= max_length={max_length}")
        loaded = load(
            model_name_or_path,
            device=self.device,
            dtype=self.dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        self.model = loaded.model
        self.num_labels = loaded.num_labels
        model_max = getattr(self.model.config, "max_position_embeddings", None)
        if model_max is not None and getattr(self.model.config, "model_type", "") in (
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
        self.runner: Runner = choose_runner(
            self.model, self.device, self.tokenizer.pad_id, fast_path
        )
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
            f"max_length={self.max_length}, normalize={self.normalize})"
        )

    # ----------------------------------------------------------------- public sync API
    def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        normalize: bool | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Score each document against ``query``; float32 array of shape ``(len(documents),)``.

        ``normalize`` overrides the instance setting for this call (``None`` keeps it).
        """
        check_query(query)
        docs = check_documents(documents)
        if not docs:
            return np.zeros(0, dtype=np.float32)
        return self._finish(self._score_texts([query] * len(docs), docs, show_progress), normalize)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Score ``[(query, document), ...]``; float32 array in input order."""
        queries, docs = check_pairs(pairs)
        if not docs:
            return np.zeros(0, dtype=np.float32)
        return self._finish(self._score_texts(queries, docs, show_progress), normalize)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        threshold: float | None = None,
    ) -> list[RerankResult]:
        """Rank ``documents`` for ``query``, best first.

        ``threshold`` keeps results whose score is ``>=`` it (normalized scores when
        ``normalize=True``); ``top_n`` is applied after it, and a ``top_n`` larger than the
        number of documents returns them all.
        """
        top_n = check_top_n(top_n)
        docs = check_documents(documents)
        check_query(query)
        return self.to_results(docs, self.score(query, docs), top_n=top_n, threshold=threshold)

    # ---------------------------------------------------------------- public async API
    async def ascore(
        self, query: str, documents: Sequence[str], *, normalize: bool | None = None
    ) -> np.ndarray:
        """Async :meth:`score`: tokenization and forward passes run off the event loop, and
        concurrent calls are merged into shared forward passes."""
        check_query(query)
        docs = check_documents(documents)
        if not docs:
            return np.zeros(0, dtype=np.float32)
        return await self._ascore([query] * len(docs), docs, normalize)

    async def ascore_pairs(
        self, pairs: Sequence[tuple[str, str]], *, normalize: bool | None = None
    ) -> np.ndarray:
        """Async :meth:`score_pairs`."""
        queries, docs = check_pairs(pairs)
        if not docs:
            return np.zeros(0, dtype=np.float32)
        return await self._ascore(queries, docs, normalize)

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
        scores = await self.ascore(query, docs)
        return self.to_results(docs, scores, top_n=top_n, threshold=threshold)

    # ------------------------------------------------------------------ building blocks
    @staticmethod
    def to_results(
        documents: Sequence[str],
        scores: np.ndarray,
        *,
        top_n: int | None = None,
        threshold: float | None = None,
    ) -> list[RerankResult]:
        """Turn scores into :class:`RerankResult` s, best first (ties keep input order)."""
        order = np.argsort(-scores, kind="stable")
        if threshold is not None:
            order = order[scores[order] >= threshold]
        if top_n is not None:
            order = order[:top_n]
        return [RerankResult(int(i), float(scores[i]), documents[i]) for i in order]

    def encode(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPairs:
        """Tokenize validated pairs (one batched fast-tokenizer call)."""
        return self.tokenizer.encode(queries, documents)

    def batcher(self, max_pending_pairs: int | None = None) -> MicroBatcher:
        """The micro-batching queue of the running event loop (created on first use)."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
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
        try:
            with self._model_lock:
                return self._run_model(encoded)
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
            return np.concatenate(
                [self.forward(encoded.take(rows[:half])), self.forward(encoded.take(rows[half:]))]
            )

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

    def _run_model(self, encoded: EncodedPairs) -> np.ndarray:
        logits = self.runner.run(encoded)
        raw = logits[:, 1] - logits[:, 0] if self.num_labels == 2 else logits[:, 0]
        return np.ascontiguousarray(raw, dtype=np.float32)

    def _score_texts(
        self, queries: list[str], documents: list[str], show_progress: bool
    ) -> np.ndarray:
        if self.runner.packed and len(documents) > _OVERLAP_MIN_PAIRS and not show_progress:
            sizes = chunk_sizes(len(documents), _FIRST_CHUNK, _OVERLAP_PAIRS)
            return score_overlapped(
                self.encode, self._score_encoded, queries, documents, sizes, self._call_pool
            )
        return self._score_encoded(self.encode(queries, documents), show_progress)

    def _score_encoded(self, encoded: EncodedPairs, show_progress: bool = False) -> np.ndarray:
        packed = self.runner.packed
        if self._replicas and encoded.total_tokens >= self.split_tokens:
            budget = min(self.batch_tokens, -(-encoded.total_tokens // (len(self._replicas) + 1)))
            budget = max(budget, int(encoded.lengths.max()))
            batches = plan_batches(encoded.lengths, budget, packed=packed)
            forwards = [self.forward, *(r.forward for r in self._replicas)]
            return run_on_devices(forwards, encoded, batches, self._call_pool)
        out = np.empty(len(encoded), dtype=np.float32)
        batches = plan_batches(encoded.lengths, self.batch_tokens, packed=packed)
        for rows in tqdm(batches, desc="scoring", unit="batch", disable=not show_progress):
            out[rows] = self.forward(encoded.take(rows))
        return out

    async def _ascore(
        self, queries: list[str], documents: list[str], normalize: bool | None
    ) -> np.ndarray:
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(None, self.encode, queries, documents)
        return self._finish(await self.batcher().submit(encoded), normalize)

    def _finish(self, raw: np.ndarray, normalize: bool | None) -> np.ndarray:
        if not (self.normalize if normalize is None else normalize):
            return raw
        return torch.sigmoid(torch.from_numpy(raw)).numpy().astype(np.float32, copy=False)
