"""The micro-batching queue: routing, fairness, cancellation, limits, failure isolation.

The forward pass is a deterministic stand-in (score = sum of a pair's token ids) so these
tests check the queue alone; engine-level async tests use the real model.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from crossrank.batching import MicroBatcher, QueueFullError
from crossrank.tokenization import EncodedPairs


def make_pairs(rng: np.random.Generator, n: int, max_len: int = 40) -> EncodedPairs:
    lengths = rng.integers(3, max_len, size=n)
    offsets = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    ids = rng.integers(0, 1000, size=int(lengths.sum()))
    return EncodedPairs(ids, offsets, lengths)


def expected(enc: EncodedPairs) -> np.ndarray:
    return np.array(
        [enc.ids[o : o + n].sum() for o, n in zip(enc.offsets, enc.lengths, strict=True)],
        np.float32,
    )


class Recorder:
    def __init__(self, delay: float = 0.002) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def __call__(self, enc: EncodedPairs) -> np.ndarray:
        time.sleep(self.delay)
        self.batches.append(len(enc))
        return expected(enc)


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()


async def test_results_are_routed_back_in_each_requests_own_order(executor) -> None:
    rng = np.random.default_rng(0)
    batcher = MicroBatcher(Recorder(), batch_tokens=512, packed=False, executor=executor)
    requests = [make_pairs(rng, int(n)) for n in rng.integers(1, 60, size=24)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for req, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(req))
    assert batcher.pending_pairs == 0


async def test_budget_is_respected_for_padded_and_packed_costs(executor) -> None:
    rng = np.random.default_rng(1)
    for packed in (False, True):
        seen: list[EncodedPairs] = []

        def forward(enc: EncodedPairs, seen: list[EncodedPairs] = seen) -> np.ndarray:
            seen.append(enc)
            return expected(enc)

        batcher = MicroBatcher(forward, batch_tokens=300, packed=packed, executor=executor)
        await asyncio.gather(*(batcher.submit(make_pairs(rng, 30)) for _ in range(4)))
        for enc in seen:
            cost = enc.lengths.sum() if packed else len(enc) * enc.lengths.max()
            assert cost <= 300 or len(enc) == 1


async def test_small_requests_are_not_starved_by_a_large_one(executor) -> None:
    rng = np.random.default_rng(2)
    batcher = MicroBatcher(Recorder(), batch_tokens=400, packed=False, executor=executor)
    finished: list[str] = []

    async def run(name: str, enc: EncodedPairs) -> None:
        await batcher.submit(enc)
        finished.append(name)

    big = asyncio.create_task(run("big", make_pairs(rng, 1000)))
    await asyncio.sleep(0.01)  # the big request is already being served
    smalls = [asyncio.create_task(run(f"small{i}", make_pairs(rng, 20))) for i in range(5)]
    await asyncio.gather(big, *smalls)
    assert finished[-1] == "big"
    assert set(finished[:5]) == {f"small{i}" for i in range(5)}


async def test_requests_that_wait_together_finish_oldest_first(executor) -> None:
    """Whole small requests fill a pass in arrival order, so that they finish one pass after
    another: taking one pair of each in turn made every request of a burst finish in the
    burst's last pass, and a server's clients then all came back at once to an idle device."""
    rng = np.random.default_rng(5)
    recorder = Recorder()
    batcher = MicroBatcher(recorder, batch_tokens=800, packed=True, executor=executor)
    requests = [make_pairs(rng, 10, max_len=20) for _ in range(24)]  # at most 200 tokens each
    finished_after: list[int] = []  # passes run when each request finished, in arrival order

    async def run(enc: EncodedPairs) -> None:
        np.testing.assert_array_equal(await batcher.submit(enc), expected(enc))
        finished_after.append(len(recorder.batches))

    await asyncio.gather(*(run(enc) for enc in requests))
    passes = len(recorder.batches)
    assert passes >= 4 and sum(recorder.batches) == 240
    assert finished_after == sorted(finished_after)  # oldest first
    # (a pass's requests are handed their results once the next pass is queued too)
    assert finished_after.count(passes) < len(requests) // 2  # most before the last pass


async def test_cancelled_requests_never_reach_the_model(executor) -> None:
    rng = np.random.default_rng(3)
    recorder = Recorder(delay=0.01)
    batcher = MicroBatcher(recorder, batch_tokens=200, packed=False, executor=executor)
    task = asyncio.create_task(batcher.submit(make_pairs(rng, 500, max_len=20)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done_after_cancel = sum(recorder.batches)
    follow_up = make_pairs(rng, 5)
    np.testing.assert_array_equal(await batcher.submit(follow_up), expected(follow_up))
    # at most the pass in flight at cancel time finished; the rest of the 500 were dropped
    assert sum(recorder.batches) - done_after_cancel <= 5 + 200 // 3
    assert sum(recorder.batches) < 500


async def test_queue_limit_raises_queue_full(executor) -> None:
    rng = np.random.default_rng(4)
    batcher = MicroBatcher(
        Recorder(delay=0.05),
        batch_tokens=100,
        packed=False,
        executor=executor,
        max_pending_pairs=50,
    )
    first = asyncio.create_task(batcher.submit(make_pairs(rng, 40)))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="limit 50"):
        await batcher.submit(make_pairs(rng, 40))
    await first


async def test_a_failing_pass_fails_only_its_requests(executor) -> None:
    rng = np.random.default_rng(5)
    calls = 0

    def forward(enc: EncodedPairs) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("device lost")
        return expected(enc)

    batcher = MicroBatcher(forward, batch_tokens=10_000, packed=False, executor=executor)
    with pytest.raises(RuntimeError, match="device lost"):
        await batcher.submit(make_pairs(rng, 3))
    ok = make_pairs(rng, 3)
    np.testing.assert_array_equal(await batcher.submit(ok), expected(ok))
