"""Token-budget batch planning and the asyncio micro-batching queue.

``plan_batches`` serves the synchronous path: sort by length, cut batches whose cost (padded
tokens, or real tokens when the engine packs sequences) stays under the budget.

``MicroBatcher`` serves every async caller (``Reranker.ascore``, the HTTP server): concurrent
requests are merged into shared forward passes. A single worker coroutine owns batching; the
forward pass runs in a worker thread so the event loop never blocks. Pairs are taken from the
pending requests round-robin, so one 1000-document request cannot starve small ones. Results
are written back into each request's own order; a cancelled request's remaining pairs are
dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from crossrank.errors import QueueFullError
from crossrank.tokenization import EncodedPairs

logger = logging.getLogger(__name__)


def batch_cost(lengths: np.ndarray, *, packed: bool) -> int:
    """Tokens one forward pass computes: padded ``n * max_len``, or the sum when packed."""
    if len(lengths) == 0:
        return 0
    return int(lengths.sum()) if packed else int(len(lengths) * lengths.max())


def plan_batches(lengths: np.ndarray, budget: int, *, packed: bool = False) -> list[np.ndarray]:
    """Split pair indices into length-sorted batches whose cost stays within ``budget``.

    Longest pairs go first so an out-of-memory condition shows up on the first batch. A pair
    longer than the budget forms a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    if packed:
        cumulative = np.cumsum(lengths[order])
        while start < n:
            base = cumulative[start - 1] if start else 0
            end = int(np.searchsorted(cumulative, base + budget, side="right"))
            end = max(end, start + 1)
            batches.append(order[start:end])
            start = end
    else:
        while start < n:
            size = max(1, budget // int(lengths[order[start]]))
            batches.append(order[start : start + size])
            start += size
    return batches


@dataclass(eq=False)
class _Request:
    encoded: EncodedPairs
    future: asyncio.Future[np.ndarray]
    order: np.ndarray
    out: np.ndarray
    cursor: int = 0
    done_pairs: int = 0

    @property
    def waiting(self) -> int:
        return len(self.order) - self.cursor


@dataclass
class _Batch:
    encoded: EncodedPairs
    owners: list[tuple[_Request, np.ndarray]]


BatchObserver = Callable[[int, int], None]
"""Called after each forward pass with (pairs, tokens computed)."""


class Observers:
    """A set of :data:`BatchObserver` s that is itself one: calling it calls each. Subscribing
    returns the function that unsubscribes (safe to call twice); both may run on any thread
    while the queue calls the set."""

    def __init__(self) -> None:
        self._observers: tuple[BatchObserver, ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, observer: BatchObserver) -> Callable[[], None]:
        with self._lock:
            self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            with self._lock:
                kept = list(self._observers)
                if observer in kept:
                    kept.remove(observer)
                self._observers = tuple(kept)

        return unsubscribe

    def __call__(self, pairs: int, tokens: int) -> None:
        for observer in self._observers:  # a snapshot: (un)subscribing replaces the tuple
            observer(pairs, tokens)


class MicroBatcher:
    """Merge concurrent scoring requests into shared, token-budgeted forward passes."""

    def __init__(
        self,
        forward: Callable[[EncodedPairs], np.ndarray],
        *,
        batch_tokens: int,
        packed: bool,
        executor: Executor,
        max_pending_pairs: int | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._forward = forward
        self._budget = batch_tokens
        self._packed = packed
        self._executor = executor
        self.max_pending_pairs = max_pending_pairs
        self._observer = observer
        self._requests: deque[_Request] = deque()
        self._worker: asyncio.Task[None] | None = None

    @property
    def pending_pairs(self) -> int:
        """Pairs queued and not yet sent to the model (the queue depth)."""
        return sum(r.waiting for r in self._requests if not r.future.done())

    async def submit(self, encoded: EncodedPairs) -> np.ndarray:
        """Score ``encoded`` through shared batches; returns raw float32 scores in its order."""
        n = len(encoded)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        limit = self.max_pending_pairs
        if limit is not None and self.pending_pairs + n > limit:
            raise QueueFullError(f"queue full: {self.pending_pairs} pairs pending, limit {limit}")
        loop = asyncio.get_running_loop()
        request = _Request(
            encoded=encoded,
            future=loop.create_future(),
            order=np.argsort(-encoded.lengths, kind="stable"),
            out=np.empty(n, dtype=np.float32),
        )
        self._requests.append(request)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await request.future

    def _next_batch(self) -> _Batch | None:
        """Take pairs round-robin from live requests until the token budget is reached."""
        live = [r for r in self._requests if not r.future.done() and r.waiting]
        self._requests = deque(live)
        if not live:
            return None
        taken: dict[int, list[int]] = {id(r): [] for r in live}
        count = total = max_len = 0
        full = False
        while not full and any(r.waiting for r in live):
            for request in live:
                if request.waiting == 0:
                    continue
                row = int(request.order[request.cursor])
                length = int(request.encoded.lengths[row])
                cost = total + length if self._packed else (count + 1) * max(max_len, length)
                if count and cost > self._budget:
                    full = True
                    break
                taken[id(request)].append(row)
                count, total, max_len = count + 1, total + length, max(max_len, length)
                request.cursor += 1
        owners = [(r, np.asarray(taken[id(r)], dtype=np.int64)) for r in live if taken[id(r)]]
        encoded = EncodedPairs.concat([r.encoded.take(rows) for r, rows in owners])
        return _Batch(encoded=encoded, owners=owners)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                scores = await loop.run_in_executor(self._executor, self._forward, batch.encoded)
            except Exception as err:  # a failed batch fails its requests, never the worker
                logger.exception("forward pass failed for %d pairs", len(batch.encoded))
                for request, _ in batch.owners:
                    if not request.future.done():
                        request.future.set_exception(err)
                continue
            if self._observer is not None:
                self._observer(
                    len(batch.encoded), batch_cost(batch.encoded.lengths, packed=self._packed)
                )
            start = 0
            for request, rows in batch.owners:
                request.out[rows] = scores[start : start + len(rows)]
                start += len(rows)
                request.done_pairs += len(rows)
                if request.done_pairs == len(request.order) and not request.future.done():
                    request.future.set_result(request.out)
