"""A chunk that finds room on the device is queued by the thread that tokenized it, as the
in-process call queues it (no hand-over to the event loop and the forward thread); such passes
count towards the queue's depth, so later requests still wait for room and are merged, and
they are observed, and fail, like the worker's passes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from crossrank.batching import MicroBatcher
from crossrank.tokenization import EncodedPairs
from tests.core.test_batching_concurrency import release, submits, until
from tests.core.test_microbatcher_pipeline import SlowRunner, encoded_of


class ForwardExecutor(ThreadPoolExecutor):
    """The queue's forward thread, counting what was queued through it."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="forward")
        self.ran = 0

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:  # type: ignore[override]
        self.ran += 1
        return super().submit(fn, *args, **kwargs)


class ThreadRecorder:
    """A fake device (``SlowRunner``) and an encoder that note the thread of every call."""

    def __init__(self) -> None:
        self.runner = SlowRunner()
        self.calls: list[tuple[str, int, str]] = []

    def encode(self, lo: int, hi: int) -> EncodedPairs:
        self.calls.append(("encode", hi - lo, threading.current_thread().name))
        return encoded_of([10] * (hi - lo), 1000 + lo)

    def submit(self, encoded: EncodedPairs):
        self.calls.append(("submit", len(encoded), threading.current_thread().name))
        return self.runner.submit(encoded)


@pytest.fixture
def recorder():
    rec = ThreadRecorder()
    yield rec
    rec.runner.released.release(1000)  # no thread is left waiting for a pass


def overlapped(recorder, batch_tokens: int, passes: int) -> tuple[np.ndarray, int]:
    """Scores of one 2 + 6 pair request through a MicroBatcher of ``batch_tokens`` (its
    ``passes`` passes released), and how many passes its forward thread ran."""
    with ForwardExecutor() as forward:
        batcher = MicroBatcher(
            submit=recorder.submit, batch_tokens=batch_tokens, packed=True, executor=forward
        )

        async def main() -> np.ndarray:
            request = batcher.submit_overlapped(recorder.encode, [2, 6])
            return (await asyncio.gather(request, release(recorder.runner, passes)))[0]

        return asyncio.run(main()), forward.ran


def test_a_lone_request_is_queued_by_the_threads_that_tokenize_it(recorder) -> None:
    scores, forward_ran = overlapped(recorder, batch_tokens=10_000, passes=2)
    assert scores.tolist() == list(range(1000, 1008))
    assert [n for kind, n, _ in recorder.calls if kind == "encode"] == [2, 6]
    assert [n for kind, n, _ in recorder.calls if kind == "submit"] == [2, 6]
    encoded_on = [t for kind, _, t in recorder.calls if kind == "encode"]
    queued_on = [t for kind, _, t in recorder.calls if kind == "submit"]
    assert queued_on == encoded_on  # each chunk queued where it was tokenized
    assert forward_ran == 0  # nothing went through the worker's forward thread


def test_a_chunk_over_the_budget_is_cut_into_passes_by_the_worker(recorder) -> None:
    scores, _ = overlapped(recorder, batch_tokens=30, passes=3)
    assert scores.tolist() == list(range(1000, 1008))
    passes = [(n, t) for kind, n, t in recorder.calls if kind == "submit"]
    assert passes[0][0] == 2 and passes[0][1] != "forward_0"  # 20 tokens: queued directly
    assert sorted(n for n, _ in passes[1:]) == [3, 3]  # 60 tokens: two passes of the budget
    assert all(t.startswith("forward") for _, t in passes[1:])


def test_direct_passes_take_the_room_of_queued_passes(recorder) -> None:
    runner = recorder.runner
    with ForwardExecutor() as forward:
        batcher = MicroBatcher(
            submit=recorder.submit, batch_tokens=10_000, packed=True, executor=forward, depth=2
        )

        async def main() -> tuple[np.ndarray, list[np.ndarray]]:
            lone = asyncio.ensure_future(batcher.submit_overlapped(recorder.encode, [2, 6]))
            await until(lambda: submits(runner) == 2)  # both chunks queued directly
            assert batcher.busy
            later = [batcher.submit(encoded_of([10] * 3, 100 * (k + 1))) for k in range(3)]
            rest = asyncio.ensure_future(asyncio.gather(*later))
            await asyncio.sleep(0.05)
            assert submits(runner) == 2  # no room: the later requests wait
            await release(runner, 1)  # the first direct pass ends: room for one pass
            await until(lambda: submits(runner) == 3)
            await release(runner, 2)
            return await lone, await rest

        lone, rest = asyncio.run(main())
    assert lone.tolist() == list(range(1000, 1008))
    assert [r.tolist() for r in rest] == [[100 * (k + 1) + i for i in range(3)] for k in range(3)]
    assert submits(recorder.runner) == 3  # the three later requests went in one pass
    assert forward.ran == 1


def test_direct_passes_are_observed_and_a_failure_fails_only_its_request() -> None:
    seen: list[tuple[int, int]] = []

    def submit(encoded: EncodedPairs):
        if (encoded.ids == 666).any():
            raise RuntimeError("device fault")
        scores = encoded.ids[encoded.offsets].astype(np.float32)
        return lambda: scores

    def encode_from(first: int) -> Callable[[int, int], EncodedPairs]:
        return lambda lo, hi: encoded_of([4] * (hi - lo), first + lo)

    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=submit,
            batch_tokens=100,
            packed=True,
            executor=forward,
            observer=lambda pairs, tokens: seen.append((pairs, tokens)),
        )

        async def main() -> tuple[np.ndarray, np.ndarray]:
            with pytest.raises(RuntimeError, match="device fault"):
                await batcher.submit_overlapped(encode_from(666), [1, 2])
            assert not batcher.busy  # the failed pass gave its room back
            return (
                await batcher.submit_overlapped(encode_from(10), [2, 3]),
                await batcher.submit(encoded_of([4, 4], 1)),
            )

        direct, queued = asyncio.run(main())
    assert direct.tolist() == [10, 11, 12, 13, 14]
    assert queued.tolist() == [1, 2]
    assert seen == [(2, 8), (3, 12), (2, 8)]  # the failed pass is not counted


def test_the_next_chunk_is_tokenized_while_the_first_is_queued(recorder) -> None:
    """Chunk 2 is tokenized once chunk 1 is, not after chunk 1 is queued: here queueing chunk
    1 waits until chunk 2's tokenization has begun (it would wait forever otherwise)."""
    second_started = threading.Event()
    queueing_waited: list[bool] = []

    def encode(lo: int, hi: int) -> EncodedPairs:
        if lo:
            second_started.set()
        return recorder.encode(lo, hi)

    def submit(encoded: EncodedPairs):
        if len(encoded) == 2:
            queueing_waited.append(second_started.wait(timeout=10))
        return recorder.submit(encoded)

    with ForwardExecutor() as forward:
        batcher = MicroBatcher(submit=submit, batch_tokens=10_000, packed=True, executor=forward)

        async def main() -> np.ndarray:
            request = batcher.submit_overlapped(encode, [2, 6])
            return (await asyncio.gather(request, release(recorder.runner, 2)))[0]

        scores = asyncio.run(main())
    assert queueing_waited == [True]
    assert scores.tolist() == list(range(1000, 1008))
    assert [n for kind, n, _ in recorder.calls if kind == "encode"] == [2, 6]


def test_a_failed_chunk_stops_the_chunks_after_it(recorder) -> None:
    encodes: list[int] = []

    def encode(lo: int, hi: int) -> EncodedPairs:
        encodes.append(lo)
        if lo == 2:
            raise ValueError("document 2 is bad")
        return recorder.encode(lo, hi)

    with ForwardExecutor() as forward:
        batcher = MicroBatcher(
            submit=recorder.submit, batch_tokens=10_000, packed=True, executor=forward, depth=8
        )

        async def main() -> None:
            release_all = asyncio.ensure_future(release(recorder.runner, 1))
            with pytest.raises(ValueError, match="document 2"):
                await batcher.submit_overlapped(encode, [2, 3, 4, 5])
            await release_all
            await until(lambda: not batcher.busy)

        asyncio.run(main())
    assert encodes == [0, 2]  # the chunks after the failed one were never tokenized
