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
from crossrank.loading import load, resolve_device, resolve_dtype
from crossrank.result import RerankResult
from crossrank.runners import Runner, TorchPaddedRunner
from crossrank.tokenization import EncodedPairs, PairTokenizer
from crossrank.validation import check_documents, check_pairs, check_query, check_top_n

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"

# Tokens per forward pass (padding included). CPU passes gain nothing from being large;
# on CUDA a larger pass keeps the GPU busy and stays far from memory limits for a
# 24-layer, 1024-wide model.
_DEFAULT_BATCH_TOKENS = {"cpu": 8192, "mps": 16384, "cuda": 65536}

_BACKENDS = ("torch", "onnx")


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
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_length: int = 512,
        query_max_length: int | None = None,
        normalize: bool = True,
        batch_tokens: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        backend: str = "torch",
        quantize: bool = False,
        onnx_cache_dir: str | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if quantize and backend != "onnx":
            raise ValueError("quantize=True needs backend='onnx' (dynamic int8 via ONNX Runtime)")
        if backend == "onnx":
            # Imported here: onnxruntime is the optional extra crossrank[onnx]; the import
            # raises an ImportError naming it when it is missing.
            from crossrank import onnx_backend

            if device == "auto":
                device = "cpu"
            if dtype == "auto":
                dtype = "float32"
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
        if backend == "onnx" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(
                "backend='onnx' runs on device='cpu' in float32 (quantize=True for int8), got "
                f"device={str(self.device)!r}, dtype={self.dtype}"
            )
        self.backend = backend
        self.quantize = bool(quantize)
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
        self.runner: Runner
        if backend == "onnx":
            self.runner = onnx_backend.build_runner(
                loaded, self.tokenizer, quantize=self.quantize, cache_dir=onnx_cache_dir
            )
        else:
            assert loaded.model is not None
            self.runner = TorchPaddedRunner(loaded.model, self.device, self.tokenizer.pad_id)
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
        encoded = self.encode([query] * len(docs), docs)
        return self._finish(self._score_encoded(encoded, show_progress), normalize)

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
        encoded = self.encode(queries, docs)
        return self._finish(self._score_encoded(encoded, show_progress), normalize)

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
        """Stop the forward-pass worker thread."""
        self._executor.shutdown(wait=True)

    # -------------------------------------------------------------------- internals
    def _observe(self, pairs: int, tokens: int) -> None:
        if self.batch_observer is not None:
            self.batch_observer(pairs, tokens)

    def _run_model(self, encoded: EncodedPairs) -> np.ndarray:
        logits = self.runner.run(encoded)
        raw = logits[:, 1] - logits[:, 0] if self.num_labels == 2 else logits[:, 0]
        return np.ascontiguousarray(raw, dtype=np.float32)

    def _score_encoded(self, encoded: EncodedPairs, show_progress: bool = False) -> np.ndarray:
        out = np.empty(len(encoded), dtype=np.float32)
        batches = plan_batches(encoded.lengths, self.batch_tokens, packed=self.runner.packed)
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
