"""Token-budget batch planning and the asyncio micro-batching queue.

``plan_batches`` serves the synchronous path: sort by length, cut batches whose cost (padded
tokens, or real tokens when the engine packs sequences) stays under the budget.

``MicroBatcher`` serves every async caller (``Reranker.ascore``, the HTTP server): concurrent
requests are merged into shared forward passes. A single worker coroutine owns batching;
passes are queued on the device from a worker thread (``submit`` returns a pending result,
as the runners' ``submit`` does) and up to ``depth`` passes are queued before the first
result is awaited, so the device runs them back to back while the event loop goes on; the
results are waited for on a thread of the queue's own, so that a finished pass is noticed
at once, not after the tokenization a server queues on the loop's default executor. A pass
is filled from the pending requests oldest first, each taking at most a ``_SHARES``-th of the
token budget before the next one's turn, in rounds while the pass has room: small requests
go into a pass whole and in arrival order, so the requests of a burst finish one pass after
another, while a 1000-document request takes at most a quarter of each pass and cannot
starve small ones. (One pair of each request in turn, the rule before, made every request of
a burst finish in its last pass: clients that send their next request once answered then
all came back at once, to a device idle while their requests were read and tokenized.)
Measured with ``benchmarks/server_busy.py --slowdown 1.5 --requests 300`` (2-core CPU, the
real server and tokenizer, a stand-in device at two thirds of the H200's rate, 32 clients,
four runs each in two sittings, the rules alternating): the device busy 91.0-97.4% of the time
against 78.2-96.9% before, in passes of 288-306 pairs against 172-242 (each burst's last pass
ran part-empty); in the second, slower sitting the old rule lost most (78-84% against
91-94%). On one H200 (``benchmarks/load.py --random full --device cuda --clients 32
--requests 1200``): the server at 0.98 of the engine's offline pairs/s, in 184 passes of 326
pairs, against 0.856 in 253 passes of 237 with the old rule (another session, same command).

Results are written back into each request's own order; a cancelled request's remaining
pairs are dropped before they reach the model. :meth:`MicroBatcher.submit_overlapped`
gives a lone request the in-process call's overlap: its first small chunk is queued while
the next chunks are tokenized (a request that finds the queue busy is tokenized in one
chunk: it is merged with the others' pairs anyway). Each chunk's tokenization starts as soon
as the one before is tokenized, as in the in-process call, not once that one is queued and
the event loop has come back to the request: on one H200 (``benchmarks/load.py --random
full --device cuda --clients 1``) the async path took 17.6 ms for a 1x50 request against the
in-process call's 16.5 ms before, 16.2 against 16.1-16.5 ms after.

A chunk that finds room on the device (fewer than ``depth`` passes queued, no pairs waiting)
is queued by the thread that tokenized it, as the in-process call does, not handed back to
the event loop and on to the forward thread: each hand-over waits for the GIL, and while
the next chunk is tokenized on another thread it waited up to the interpreter's 5 ms switch
interval. Measured on a 2-core CPU with a fake device (a pass takes the H200's time for its
tokens, 11.6 ms for 1x50, off the GIL), real tokenizer, 1x50 XQuAD-R, calls alternating:
from tokenized to queued took 4.5 ms for the first chunk through the loop and the forward
thread, 0.05 ms now; ``Reranker.ascore_raw`` p50 over ``Reranker.score`` p50 went from
1.05-1.09x to 1.02x. On one H200 (real model shape, ``benchmarks/load.py``): 17.6 ms async
against 18.0 ms sync (``docs/benchmarks.md``, server section).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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


#: A request takes at most this fraction of a pass's token budget before the next request's
#: turn (see :class:`MicroBatcher`).
_SHARES = 4


@dataclass
class _Fill:
    """A pass being filled: its cost so far against the token budget."""

    budget: int
    packed: bool
    count: int = 0
    total: int = 0
    max_len: int = 0
    full: bool = False

    def share_of(self, request: _Request, share: int) -> list[int]:
        """Take ``request``'s next rows, at least one, up to ``share`` tokens of its own or
        until the pass is full (``full`` is then set)."""
        rows: list[int] = []
        own = 0
        while request.waiting:
            row = int(request.order[request.cursor])
            length = int(request.encoded.lengths[row])
            if rows and own + length > share:
                break
            cost = (
                self.total + length if self.packed else (self.count + 1) * max(self.max_len, length)
            )
            if self.count and cost > self.budget:
                self.full = True
                break
            rows.append(row)
            own += length
            self.count, self.total = self.count + 1, self.total + length
            self.max_len = max(self.max_len, length)
            request.cursor += 1
        return rows


BatchObserver = Callable[[int, int], None]
"""Called after each forward pass with (pairs, tokens computed)."""

Pending = Callable[[], np.ndarray]
"""A queued forward pass: call it to wait for its raw scores (``crossrank.backends.base.Pending``)."""

Submit = Callable[[EncodedPairs], Pending]


def _in_turn(
    encode: Callable[[int, int], EncodedPairs], sizes: Sequence[int], cancelled: threading.Event
) -> list[tuple[Callable[[int, int], EncodedPairs], tuple[int, int]]]:
    """``encode`` for each chunk of ``sizes`` with its bounds, the chunks tokenized one after
    the other: each starts once the one before is tokenized (not queued), so they can all be
    started at once and the CPU still takes the first chunk first. A chunk whose request was
    cancelled, or whose earlier chunk failed, is not tokenized."""
    bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    done = [threading.Event() for _ in sizes]

    def step(k: int, lo: int, hi: int) -> EncodedPairs:
        if k:
            done[k - 1].wait()
        try:
            if cancelled.is_set():
                raise CancelledError("request cancelled")
            return encode(lo, hi)
        except BaseException:
            cancelled.set()  # the request has failed: the chunks after this one stop
            raise
        finally:
            done[k].set()

    return [(functools.partial(step, k), (bounds[k], bounds[k + 1])) for k in range(len(sizes))]


def _finished(forward: Callable[[EncodedPairs], np.ndarray]) -> Submit:
    """A ``submit`` that runs ``forward`` at once and hands back its finished result."""

    def submit(encoded: EncodedPairs) -> Pending:
        scores = forward(encoded)
        return lambda: scores

    return submit


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
        forward: Callable[[EncodedPairs], np.ndarray] | None = None,
        *,
        submit: Submit | None = None,
        batch_tokens: int,
        packed: bool,
        executor: Executor,
        max_pending_pairs: int | None = None,
        observer: BatchObserver | None = None,
        depth: int = 2,
    ) -> None:
        """``submit`` queues one pass (on ``executor``, one thread) and returns its pending
        result, which is waited for on another thread; at most ``depth`` passes are queued
        at once. A plain ``forward`` (scores of one pass, computed before it returns) may be
        given instead: passes then run one after the other."""
        if submit is None:
            if forward is None:
                raise TypeError("MicroBatcher needs forward or submit")
            submit = _finished(forward)
        self._submit = submit
        self._budget = batch_tokens
        self._packed = packed
        self._executor = executor
        self.max_pending_pairs = max_pending_pairs
        self._observer = observer
        self.depth = depth
        self._requests: deque[_Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._arrived: asyncio.Event | None = None
        self._inflight = 0  # passes the worker queued and has not handed out yet
        self._direct = 0  # chunks being queued, or queued, by the thread that tokenized them
        # Waits for queued passes (they finish in order): a thread of the queue's own, so that
        # a finished pass is noticed at once, never behind tokenization queued on the loop's
        # default executor (which left the device idle while requests waited).
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="crossrank-collect")

    @property
    def pending_pairs(self) -> int:
        """Pairs queued and not yet sent to the model (the queue depth)."""
        return sum(r.waiting for r in self._requests if not r.future.done())

    @property
    def busy(self) -> bool:
        """Whether a new request would wait: pairs are queued, or ``depth`` passes are."""
        return self._inflight + self._direct >= self.depth or self.pending_pairs > 0

    def close(self) -> None:
        """Stop the thread that waits for passes (a wait still running ends with its pass)."""
        self._collector.shutdown(wait=False, cancel_futures=True)

    async def submit(self, encoded: EncodedPairs) -> np.ndarray:
        """Score ``encoded`` through shared batches; returns raw float32 scores in its order."""
        self._check_room(len(encoded))
        return await self._enqueue(encoded)

    async def submit_overlapped(
        self,
        encode: Callable[[int, int], EncodedPairs],
        sizes: Sequence[int],
        executor: Executor | None = None,
    ) -> np.ndarray:
        """Score pairs tokenized in chunks of ``sizes`` (``encode(lo, hi)`` gives one row per
        pair ``lo..hi-1``, run on ``executor``): chunk ``k + 1`` is tokenized as soon as
        chunk ``k`` is, while chunk ``k`` is queued and waits in the queue or on the device,
        as the in-process call overlaps them. The chunks the device has room for
        (``depth`` passes) are started at once; each later one once the one before is
        queued, when it finds out whether it has room on the device or joins the queue
        (merged with requests that arrived meanwhile). Raw float32 scores in pair order.

        When the queue is :attr:`busy` the pairs are tokenized in one chunk: the device has
        work to overlap with already, and one chunk is one tokenizer call and one request
        to merge into passes, not several."""
        self._check_room(sum(sizes))
        if self.busy:
            sizes = [sum(sizes)]
        cancelled = threading.Event()
        steps = _in_turn(encode, sizes, cancelled)
        room = max(1, self.depth - self._inflight - self._direct)
        chunks = [  # as many as the device has room for, started at once
            asyncio.ensure_future(self._chunk(step, lo, hi, executor, cancelled))
            for step, (lo, hi) in steps[:room]
        ]
        try:
            queued = [await chunk for chunk in chunks]
            for step, (lo, hi) in steps[room:]:  # each once the one before is queued
                chunks.append(asyncio.ensure_future(self._chunk(step, lo, hi, executor, cancelled)))
                queued.append(await chunks[-1])
            parts = [await future for future in queued]
        except BaseException:
            cancelled.set()
            for chunk in chunks:
                chunk.cancel()
                if chunk.done() and not chunk.cancelled() and chunk.exception() is None:
                    chunk.result().cancel()
            await asyncio.gather(*chunks, return_exceptions=True)
            raise
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    async def _chunk(
        self,
        encode: Callable[[int, int], EncodedPairs],
        lo: int,
        hi: int,
        executor: Executor | None,
        cancelled: threading.Event,
    ) -> asyncio.Future[np.ndarray]:
        """Tokenize pairs ``lo..hi-1`` on ``executor``; the future of their scores. With room
        on the device the tokenizing thread queues them itself, as one pass (a chunk over the
        token budget goes through the queue instead); otherwise they join the queue."""
        loop = asyncio.get_running_loop()
        if self.busy:
            return self._enqueue(await loop.run_in_executor(executor, encode, lo, hi))
        self._direct += 1  # counts as a queued pass from now: later requests see the room taken
        try:
            encoded, waited = await loop.run_in_executor(
                executor, self._encode_and_queue, encode, lo, hi, cancelled
            )
        except BaseException:
            cancelled.set()  # a chunk still being tokenized is not queued after all
            self._direct_done()
            raise
        if waited is None:  # over the budget: its passes are cut by the worker
            self._direct_done()
            return self._enqueue(encoded)
        scores: asyncio.Future[np.ndarray] = asyncio.wrap_future(waited, loop=loop)

        async def observed() -> np.ndarray:
            """The scores, once the pass is counted and observed (before the caller sees them)."""
            try:
                return await scores
            finally:
                self._direct_finished(encoded, scores)

        return asyncio.ensure_future(observed())

    def _encode_and_queue(
        self,
        encode: Callable[[int, int], EncodedPairs],
        lo: int,
        hi: int,
        cancelled: threading.Event,
    ) -> tuple[EncodedPairs, Future[np.ndarray] | None]:
        """On the tokenizing thread: encode, and queue the chunk as one pass unless it is
        over the token budget (then ``None``: the caller queues it). Its scores are waited
        for on the collector thread."""
        encoded = encode(lo, hi)
        if len(encoded) == 0 or batch_cost(encoded.lengths, packed=self._packed) > self._budget:
            return encoded, None
        if cancelled.is_set():  # the request went away while it was tokenized
            raise CancelledError("request cancelled")
        pending = self._submit(encoded)
        return encoded, self._collector.submit(pending)

    def _direct_finished(self, encoded: EncodedPairs, done: asyncio.Future[np.ndarray]) -> None:
        """A pass the tokenizing thread queued is over: count it, or log its failure."""
        self._direct_done()
        if done.cancelled():
            return
        if done.exception() is not None:
            logger.error(
                "forward pass failed for %d pairs", len(encoded), exc_info=done.exception()
            )
        elif self._observer is not None:
            self._observer(len(encoded), batch_cost(encoded.lengths, packed=self._packed))

    def _direct_done(self) -> None:
        """One fewer pass queued outside the worker: room for the worker's waiting pairs."""
        self._direct -= 1
        if self._requests:
            self._wake()

    def _check_room(self, n: int) -> None:
        limit = self.max_pending_pairs
        if limit is not None and self.pending_pairs + n > limit:
            raise QueueFullError(f"queue full: {self.pending_pairs} pairs pending, limit {limit}")

    def _enqueue(self, encoded: EncodedPairs) -> asyncio.Future[np.ndarray]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        n = len(encoded)
        if n == 0:
            future.set_result(np.zeros(0, dtype=np.float32))
            return future
        order = np.argsort(-encoded.lengths, kind="stable")
        self._requests.append(_Request(encoded, future, order, np.empty(n, dtype=np.float32)))
        self._wake()
        return future

    def _wake(self) -> None:
        """Have the worker look at the queue again (started if it is not running)."""
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def _next_batch(self) -> _Batch | None:
        """Fill a pass up to the token budget from the live requests, oldest first, each
        taking a share of at most a ``_SHARES``-th of the budget per round (see the class
        docstring); rounds repeat while the pass has room and pairs wait."""
        live = [r for r in self._requests if not r.future.done() and r.waiting]
        self._requests = deque(live)
        if not live:
            return None
        fill, share = _Fill(self._budget, self._packed), self._budget // _SHARES
        taken: dict[int, list[int]] = {id(r): [] for r in live}
        while not fill.full and any(r.waiting for r in live):
            for request in live:
                taken[id(request)] += fill.share_of(request, share)
                if fill.full:
                    break
        owners = [(r, np.asarray(taken[id(r)], dtype=np.int64)) for r in live if taken[id(r)]]
        encoded = EncodedPairs.concat([r.encoded.take(rows) for r, rows in owners])
        return _Batch(encoded=encoded, owners=owners)

    async def _run(self) -> None:
        """Queue passes (up to ``depth`` at once) and hand out their results, in order."""
        self._arrived = asyncio.Event()
        inflight: deque[tuple[_Batch, asyncio.Future[np.ndarray]]] = deque()
        self._inflight = 0
        while True:
            self._arrived.clear()
            while self._room(inflight) and (batch := self._next_batch()) is not None:
                self._inflight = len(inflight) + 1  # taken from the queue: counts as queued
                inflight.append((batch, await self._queue(batch)))
            if not inflight:
                return  # pairs left waiting for room are picked up when a direct pass ends
            oldest = inflight[0][1]
            if self._room(inflight) or self._direct:  # room now, or once a direct pass ends:
                # also wake when a request arrives or a direct pass ends
                arrived = asyncio.ensure_future(self._arrived.wait())
                either: set[asyncio.Future[Any]] = {oldest, arrived}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
                if not oldest.done():
                    continue
            batch, result = inflight[0]
            try:
                scores = await result
            except Exception as err:  # a failed batch fails its requests, never the worker
                logger.exception("forward pass failed for %d pairs", len(batch.encoded))
                self._fail(batch, err)
                continue
            finally:
                inflight.popleft()
                self._inflight = len(inflight)
            self._deliver(batch, scores)

    def _room(self, inflight: deque[Any]) -> bool:
        """Whether the worker may queue another pass (the tokenizing threads' count too)."""
        return len(inflight) + self._direct < self.depth

    async def _queue(self, batch: _Batch) -> asyncio.Future[np.ndarray]:
        """Queue ``batch`` on the device; the future waits for its scores on the collector."""
        loop = asyncio.get_running_loop()
        try:
            pending = await loop.run_in_executor(self._executor, self._submit, batch.encoded)
        except Exception as err:
            failed: asyncio.Future[np.ndarray] = loop.create_future()
            failed.set_exception(err)
            return failed
        return loop.run_in_executor(self._collector, pending)

    @staticmethod
    def _fail(batch: _Batch, err: Exception) -> None:
        for request, _ in batch.owners:
            if not request.future.done():
                request.future.set_exception(err)

    def _deliver(self, batch: _Batch, scores: np.ndarray) -> None:
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
