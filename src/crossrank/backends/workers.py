"""Per-device workers, and spreading one scoring call over time and over devices.

A :class:`DeviceWorker` is one device's share of an engine: its runner, a lock that keeps one
thread at a time queueing passes on it, and the out-of-memory rule (a failed pass is split in
halves and retried). An engine on several devices holds one worker per device and shares its
tokenizer, cache and thread pools between them: :class:`DevicePool` queues a call's batches on
one worker or, for a large call, spreads them over all.

Spreading over time (tokenize the next chunk while the GPU scores this one) and over devices
are plain threads: the fast tokenizer releases the GIL while it encodes, and a CUDA
forward pass is queued on the device without waiting for it (``Runner.submit``), so one
process keeps a GPU (or several) busy without a process pool, and small calls pay nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, wait
from typing import TYPE_CHECKING

import numpy as np
import torch

from crossrank.backends.base import Pending, Runner
from crossrank.backends.families import raw_scores
from crossrank.batching import plan_batches
from crossrank.options import EngineOptions
from crossrank.tokenization import EncodedPairs, rust_parallelism

if TYPE_CHECKING:
    from crossrank.backends.selfcheck import SelfCheck

logger = logging.getLogger(__name__)

Encode = Callable[[Sequence[str], Sequence[str]], EncodedPairs]
Submit = Callable[[EncodedPairs], Pending]

#: The most chunks :func:`score_overlapped` tokenizes ahead (see :func:`tokenize_ahead`).
MOST_AHEAD = 2


def chunk_sizes(n: int, first: int, largest: int, growth: int = 4) -> list[int]:
    """Chunk sizes for :func:`score_overlapped`: a small first chunk (it is tokenized before
    the GPU has anything to do), then chunks growing ``growth``-fold up to ``largest``; a
    tail smaller than half the next chunk is merged into it."""
    sizes: list[int] = []
    size, left = first, n
    while left:
        take = min(size, left)
        if left - take < take // 2:
            take = left
        sizes.append(take)
        left -= take
        size = min(size * growth, largest)
    return sizes


def overlap_sizes(n: int, options: EngineOptions, *, packed: bool) -> list[int] | None:
    """The chunk sizes in which ``n`` pairs are tokenized while earlier chunks are scored
    (:func:`score_overlapped`), or ``None`` when overlapping is not worth it: at most
    ``options.overlap_min_pairs`` pairs, or a padded runner."""
    if not packed or n <= options.overlap_min_pairs:
        return None
    return chunk_sizes(n, options.overlap_first_chunk, options.overlap_chunk_pairs)


def tokenize_ahead() -> int:
    """Chunks :func:`score_overlapped` tokenizes ahead of the one being queued: two where
    crossrank's own threads tokenize, one where the Rust tokenizer parallelizes a call
    itself (:func:`~crossrank.tokenization.rust_parallelism`).

    Measured on one H200 (16-core host; bge-reranker-v2-m3 random weights, 2,000 pairs in
    one call, calls alternating between 1, 2 and 3 chunks ahead, pairs/s):

    ======================== ============================ ===========================
    tokenizer threads         long documents (507 tokens)  XQuAD-R (193 tokens)
    ======================== ============================ ===========================
    crossrank's (``false``)   1,044 / **1,251** / 900       3,920 / 3,919 / 3,549
    the tokenizer's own       **1,321** / 1,288 / 1,260     **3,969** / 3,940 / 3,813
    ======================== ============================ ===========================

    With crossrank's threads and one chunk ahead, long documents left those threads idle
    80 % of the time (py-spy) while queueing a chunk waited for the device, and the thread
    tokenizing the next chunk waited 38 % for the chunk before it to be queued: 1,011
    pairs/s where tokenization alone ran 1,366 and the device alone 1,486. crossrank's
    threads take one chunk each, so those done first idle until a call's last chunk ends;
    a second call in flight gives them work. The tokenizer's own threads take work pair by
    pair, and there a second call only competed with the first.
    """
    return 1 if rust_parallelism() else MOST_AHEAD


def score_overlapped(
    encode: Encode,
    submit: Submit,
    queries: Sequence[str],
    documents: Sequence[str],
    sizes: Sequence[int],
    executor: Executor,
    ahead: int | None = None,
) -> np.ndarray:
    """Score pairs in chunks of ``sizes``: up to ``ahead`` later chunks are tokenized on
    ``executor`` while the chunks before them are queued on the device from the calling
    thread, and the results are collected once every chunk is queued, so the device runs
    the chunks back to back. The first chunk is tokenized on the calling thread (there is
    nothing to overlap it with yet). float32 scores in input order.

    Why more than one chunk ahead: queueing a chunk waits while the device already holds
    its limit of passes, and a tokenizer that waited with it left the CPU idle for that
    time, then the device for the time of the next chunk's tokenization. ``ahead``:
    :func:`tokenize_ahead` unless given."""
    out = np.empty(len(documents), dtype=np.float32)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    if bounds[-1] != len(documents):
        raise ValueError(f"chunk sizes add up to {bounds[-1]}, not {len(documents)} pairs")

    def chunk(k: int) -> EncodedPairs:
        return encode(queries[bounds[k] : bounds[k + 1]], documents[bounds[k] : bounds[k + 1]])

    ahead = tokenize_ahead() if ahead is None else ahead
    encoded = chunk(0)
    later = deque(executor.submit(chunk, k) for k in range(1, min(1 + ahead, len(sizes))))
    queued: list[Pending] = []
    try:
        for k in range(len(sizes)):
            queued.append(submit(encoded))
            if later:
                encoded = later.popleft().result()
                if k + 1 + ahead < len(sizes):
                    later.append(executor.submit(chunk, k + 1 + ahead))
    finally:
        for future in later:  # a failed call tokenizes nothing more
            future.cancel()
    for k, result in enumerate(queued):
        out[bounds[k] : bounds[k + 1]] = result()
    return out


def assign_batches(costs: Sequence[int], devices: int) -> list[list[int]]:
    """Give each batch (by index) to the device with the least work so far, largest first."""
    loads = [0] * devices
    groups: list[list[int]] = [[] for _ in range(devices)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        k = loads.index(min(loads))
        groups[k].append(i)
        loads[k] += costs[i]
    return groups


def run_on_devices(
    submits: Sequence[Submit],
    encoded: EncodedPairs,
    batches: Sequence[np.ndarray],
    executor: Executor,
) -> np.ndarray:
    """Run ``batches`` (row indices into ``encoded``) over several devices at once, one thread
    per device; ``submits[k]`` queues a pass on device ``k``. Each thread queues all of its
    device's passes before collecting them. Scores come back in input order."""
    out = np.empty(len(encoded), dtype=np.float32)
    costs = [int(encoded.lengths[rows].sum()) for rows in batches]
    groups = assign_batches(costs, len(submits))

    def work(device: int) -> None:
        queued = [(i, submits[device](encoded.take(batches[i]))) for i in groups[device]]
        for i, result in queued:
            out[batches[i]] = result()

    futures = [executor.submit(work, k) for k in range(len(submits)) if groups[k]]
    wait(futures)
    for future in futures:
        future.result()  # re-raise the first failure
    return out


class DeviceWorker:
    """One device's runner, the lock serialising submissions to it, and the OOM split.

    ``rescue`` (float16/bfloat16 models) rescores a pass whose logits are not all finite, and
    ``self_check`` is the fast runner's check at load (:mod:`crossrank.backends.selfcheck`).
    """

    def __init__(
        self,
        runner: Runner,
        device: torch.device,
        num_labels: int,
        *,
        rescue: Runner | None = None,
        self_check: SelfCheck | None = None,
    ) -> None:
        self.runner = runner
        self.device = device
        self.num_labels = num_labels
        self.rescue = rescue
        self.self_check = self_check
        #: Passes rescored by ``rescue`` since start.
        self.rescored_batches = 0
        self._lock = threading.Lock()

    def submit(self, encoded: EncodedPairs) -> Pending:
        """Queue one forward pass; the result gives raw float32 scores in ``encoded`` order.

        CUDA allocates while kernels are queued, so out-of-memory surfaces here, before any
        waiting; the failed pass is split in halves, each queued the same way (passes that
        succeed are never recomputed). A pair that alone does not fit raises a
        ``RuntimeError`` saying so.
        """
        try:
            with self._lock:
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
            first, second = (self.submit(encoded.take(part)) for part in (rows[:half], rows[half:]))
            return lambda: np.concatenate([first(), second()])
        return lambda: self._scores(encoded, logits())

    def _scores(self, encoded: EncodedPairs, logits: np.ndarray) -> np.ndarray:
        """Raw scores of a finished pass; non-finite half-precision logits are rescored."""
        if self.rescue is not None and not np.isfinite(logits).all():
            with self._lock:  # the rescue swaps the shared model's parameters while it runs
                self.rescored_batches += 1
                log = logger.warning if self.rescored_batches == 1 else logger.debug
                log(
                    "non-finite logits in a pass of %d pairs on %s; rescoring it in float32 "
                    "(%d passes so far)",
                    len(encoded),
                    self.device,
                    self.rescored_batches,
                )
                logits = self.rescue.run(encoded)
        return raw_scores(logits, self.num_labels)


class DevicePool:
    """An engine's workers (the first is its main device) and how a call uses them: calls of
    at least ``split_tokens`` tokens are spread over every device, smaller ones run on the
    first. ``executor`` runs one thread per device while a call is spread."""

    def __init__(self, workers: Sequence[DeviceWorker], split_tokens: int, executor: Executor):
        if not workers:
            raise ValueError("a device pool needs at least one worker")
        self.workers = list(workers)
        self.split_tokens = split_tokens
        self._executor = executor

    @property
    def self_check(self) -> SelfCheck | None:
        """The workers' fast-path checks at load, the worst first (a failure, else the
        largest difference); ``None`` when none ran."""
        checks = [w.self_check for w in self.workers if w.self_check is not None]
        return max(checks, key=lambda c: (c.fell_back, c.max_abs_diff), default=None)

    @property
    def rescored_batches(self) -> int:
        """Passes rescored in float32 on every device since start."""
        return sum(w.rescored_batches for w in self.workers)

    def spreads(self, encoded: EncodedPairs) -> bool:
        """Whether ``encoded`` is large enough to be spread over several devices."""
        return len(self.workers) > 1 and encoded.total_tokens >= self.split_tokens

    def submit(self, encoded: EncodedPairs, batch_tokens: int) -> Pending:
        """Queue every pass of ``encoded`` (batches of at most ``batch_tokens`` tokens); the
        result gives raw scores in ``encoded`` order."""
        packed = self.workers[0].runner.packed
        if self.spreads(encoded):
            share = -(-encoded.total_tokens // len(self.workers))
            budget = max(min(batch_tokens, share), int(encoded.lengths.max()))
            batches = plan_batches(encoded.lengths, budget, packed=packed)
            submits = [worker.submit for worker in self.workers]
            scores = run_on_devices(submits, encoded, batches, self._executor)
            return lambda: scores
        batches = plan_batches(encoded.lengths, batch_tokens, packed=packed)
        queued = [(rows, self.workers[0].submit(encoded.take(rows))) for rows in batches]

        def result() -> np.ndarray:
            out = np.empty(len(encoded), dtype=np.float32)
            for rows, pending in queued:
                out[rows] = pending()
            return out

        return result
