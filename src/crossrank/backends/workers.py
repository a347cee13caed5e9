"""Spreading one scoring call over time (tokenize while the GPU works) and over devices.

Both are plain threads: the fast tokenizer releases the GIL while it encodes, and a CUDA
forward pass is queued on the device without waiting for it (``Runner.submit``), so one
process keeps a GPU (or several) busy without a process pool, and small calls pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, wait

import numpy as np

from crossrank.runners import Pending
from crossrank.tokenization import EncodedPairs

Encode = Callable[[Sequence[str], Sequence[str]], EncodedPairs]
Submit = Callable[[EncodedPairs], Pending]


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


def score_overlapped(
    encode: Encode,
    submit: Submit,
    queries: Sequence[str],
    documents: Sequence[str],
    sizes: Sequence[int],
    executor: Executor,
) -> np.ndarray:
    """Score pairs in chunks of ``sizes``: chunk ``k + 1`` is tokenized on ``executor`` while
    chunk ``k`` is queued on the device from the calling thread, and the results are
    collected once every chunk is queued, so the device runs the chunks back to back. The
    first chunk is tokenized on the calling thread (there is nothing to overlap it with yet).
    float32 scores in input order."""
    out = np.empty(len(documents), dtype=np.float32)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    if bounds[-1] != len(documents):
        raise ValueError(f"chunk sizes add up to {bounds[-1]}, not {len(documents)} pairs")
    encoded = encode(queries[: bounds[1]], documents[: bounds[1]])
    queued: list[Pending] = []
    for k in range(len(sizes)):
        last = k + 1 == len(sizes)
        if not last:
            lo, hi = bounds[k + 1], bounds[k + 2]
            encoding = executor.submit(encode, queries[lo:hi], documents[lo:hi])
        queued.append(submit(encoded))
        if not last:
            encoded = encoding.result()
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
