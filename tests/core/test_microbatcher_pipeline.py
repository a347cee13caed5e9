"""The micro-batching queue queues passes without waiting for the previous one, and gives a
lone request the tokenize-while-scoring overlap; scores and order stay those of the model."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from crossrank.batching import MicroBatcher
from crossrank.tokenization import EncodedPairs


def encoded_of(lengths: list[int], first_id: int = 0) -> EncodedPairs:
    """One pair per length; a pair's ids all equal its own number (its expected score)."""
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    ids = np.repeat(np.arange(first_id, first_id + len(lengths)), lengths_arr)
    offsets = np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64)
    return EncodedPairs(ids.astype(np.int64), offsets, lengths_arr)


class SlowRunner:
    """A fake device: ``submit`` returns at once; a pass finishes only when released."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.released = threading.Semaphore(0)
        self.lock = threading.Lock()

    def submit(self, encoded: EncodedPairs):
        with self.lock:
            k = sum(e.startswith("submit") for e in self.events)
            self.events.append(f"submit {k}")
        scores = encoded.ids[encoded.offsets].astype(np.float32)  # first id of each pair

        def result() -> np.ndarray:
            self.released.acquire()
            with self.lock:
                self.events.append(f"done {k}")
            return scores

        return result


def run(coro):
    return asyncio.run(coro)


def test_two_passes_are_queued_before_the_first_result_is_awaited() -> None:
    runner = SlowRunner()
    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=runner.submit, batch_tokens=40, packed=True, executor=forward, depth=2
        )

        async def main() -> np.ndarray:
            task = asyncio.ensure_future(batcher.submit(encoded_of([10] * 12)))
            while sum(e.startswith("submit") for e in runner.events) < 2:
                await asyncio.sleep(0.01)
            assert not any(e.startswith("done") for e in runner.events)  # nothing awaited yet
            for _ in range(12):
                runner.released.release()
            return await task

        scores = run(main())
    assert runner.events[:2] == ["submit 0", "submit 1"]
    assert scores.tolist() == list(range(12))  # every pair's own score, in input order


def test_lone_request_overlapped_chunks_keep_scores_and_order() -> None:
    runner = SlowRunner()
    for _ in range(100):
        runner.released.release()
    encodes: list[tuple[int, int]] = []
    lengths = [5 + (i * 7) % 13 for i in range(50)]

    def encode(lo: int, hi: int) -> EncodedPairs:
        encodes.append((lo, hi))
        return encoded_of(lengths[lo:hi], first_id=lo)

    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(submit=runner.submit, batch_tokens=64, packed=True, executor=forward)
        scores = run(batcher.submit_overlapped(encode, [12, 38]))
    assert encodes == [(0, 12), (12, 50)]
    assert scores.tolist() == list(range(50))


def test_concurrent_requests_get_their_own_scores() -> None:
    runner = SlowRunner()
    for _ in range(1000):
        runner.released.release()
    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=runner.submit, batch_tokens=50, packed=False, executor=forward
        )

        async def main() -> list[np.ndarray]:
            calls = [batcher.submit(encoded_of([3 + k % 5] * (k + 1), 100 * k)) for k in range(8)]
            return await asyncio.gather(*calls)

        results = run(main())
    for k, scores in enumerate(results):
        assert scores.tolist() == [100 * k + i for i in range(k + 1)]


def test_a_failed_pass_fails_its_requests_only() -> None:
    def submit(encoded: EncodedPairs):
        if (encoded.ids == 666).any():
            raise RuntimeError("device fault")
        return lambda: encoded.ids[encoded.offsets].astype(np.float32)

    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(submit=submit, batch_tokens=4, packed=True, executor=forward)

        async def main() -> tuple[object, object]:
            bad = batcher.submit(encoded_of([4], 666))
            good = batcher.submit(encoded_of([4, 4], 1))
            return tuple(await asyncio.gather(bad, good, return_exceptions=True))

        bad, good = run(main())
    assert isinstance(bad, RuntimeError)
    assert np.asarray(good).tolist() == [1, 2]
