"""The micro-batching queue under concurrent requests: passes are waited for on the queue's own
thread (never behind work queued on the loop's default executor, where a server tokenizes),
requests that arrive while the device is busy share one pass, and a busy queue takes a
request in one chunk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from crossrank.batching import MicroBatcher
from tests.core.test_microbatcher_pipeline import SlowRunner, encoded_of


class RecordingExecutor(ThreadPoolExecutor):
    """The loop's default executor, remembering what was run on it."""

    def __init__(self) -> None:
        super().__init__(4)
        self.ran: list[str] = []

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:  # type: ignore[override]
        self.ran.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def runner():
    """A fake device whose passes finish when the test releases them (all of them at the
    end, so that no thread is left waiting for one)."""
    slow = SlowRunner()
    yield slow
    slow.released.release(1000)


def submits(runner: SlowRunner) -> int:
    return sum(e.startswith("submit") for e in runner.events)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_results_are_waited_for_off_the_default_executor(runner: SlowRunner) -> None:
    waiters: list[str] = []
    submit = runner.submit

    def recording_submit(encoded):
        pending = submit(encoded)

        def wait() -> np.ndarray:
            waiters.append(threading.current_thread().name)
            return pending()

        return wait

    default = RecordingExecutor()
    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=recording_submit, batch_tokens=40, packed=True, executor=forward
        )

        async def main() -> list[np.ndarray]:
            asyncio.get_running_loop().set_default_executor(default)
            for _ in range(6):
                runner.released.release()
            return await asyncio.gather(
                *(batcher.submit(encoded_of([10] * 4, 4 * k)) for k in range(3))
            )

        results = asyncio.run(main())
    assert [r.tolist() for r in results] == [list(range(4 * k, 4 * k + 4)) for k in range(3)]
    assert default.ran == []  # nothing of the queue waited behind the loop's other work
    assert waiters and all(name.startswith("crossrank-collect") for name in waiters)


def test_requests_arriving_while_the_device_is_busy_share_one_pass(runner: SlowRunner) -> None:
    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=runner.submit, batch_tokens=10_000, packed=True, executor=forward
        )

        async def main() -> list[np.ndarray]:
            first = asyncio.ensure_future(batcher.submit(encoded_of([10] * 5, 0)))
            await until(lambda: submits(runner) == 1)
            second = asyncio.ensure_future(batcher.submit(encoded_of([10] * 5, 100)))
            await until(lambda: submits(runner) == 2)  # depth 2: both passes are queued
            assert batcher.busy
            later = [batcher.submit(encoded_of([10] * 5, 200 + 10 * k)) for k in range(6)]
            rest = asyncio.ensure_future(asyncio.gather(*later))
            await asyncio.sleep(0.05)
            assert submits(runner) == 2  # the later requests wait for room on the device
            for _ in range(3):
                runner.released.release()
            return [await first, await second, *await rest]

        results = asyncio.run(main())
    assert submits(runner) == 3  # the six later requests went in one pass
    starts = [0, 100, *(200 + 10 * k for k in range(6))]
    assert [r.tolist() for r in results] == [list(range(s, s + 5)) for s in starts]


def test_a_busy_queue_takes_a_request_in_one_chunk(runner: SlowRunner) -> None:
    encodes: list[tuple[int, int]] = []

    def encode(lo: int, hi: int):
        encodes.append((lo, hi))
        return encoded_of([10] * (hi - lo), 1000 + lo)

    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(
            submit=runner.submit, batch_tokens=10_000, packed=True, executor=forward
        )

        async def main() -> np.ndarray:
            lone = await asyncio.gather(
                batcher.submit_overlapped(encode, [2, 6]), release(runner, 2)
            )
            assert encodes == [(0, 2), (2, 8)]  # an idle queue: chunk by chunk
            encodes.clear()
            held = [asyncio.ensure_future(batcher.submit(encoded_of([10], 0)))]
            await until(lambda: submits(runner) == 3)
            held.append(asyncio.ensure_future(batcher.submit(encoded_of([10], 1))))
            await until(lambda: submits(runner) == 4)  # two passes queued: no room now
            assert batcher.busy
            scores = asyncio.ensure_future(batcher.submit_overlapped(encode, [2, 6]))
            await until(lambda: bool(encodes))
            await release(runner, 3)
            assert [h.tolist() for h in await asyncio.gather(*held)] == [[0], [1]]
            assert lone[0].tolist() == list(range(1000, 1008))
            return await scores

        scores = asyncio.run(main())
    assert encodes == [(0, 8)]
    assert scores.tolist() == list(range(1000, 1008))


async def release(runner: SlowRunner, passes: int) -> None:
    for _ in range(passes):
        runner.released.release()


def test_close_stops_the_thread_that_waits_for_passes(runner: SlowRunner) -> None:
    before = set(threading.enumerate())
    with ThreadPoolExecutor(1) as forward:
        batcher = MicroBatcher(submit=runner.submit, batch_tokens=40, packed=True, executor=forward)

        async def main() -> np.ndarray:
            runner.released.release()
            return await batcher.submit(encoded_of([10] * 2, 0))

        assert asyncio.run(main()).tolist() == [0, 1]
        new = set(threading.enumerate()) - before
        collectors = [t for t in new if t.name.startswith("crossrank-collect")]
        assert collectors  # this queue's wait above ran on one
        batcher.close()
        for thread in collectors:
            thread.join(10)
        assert not any(thread.is_alive() for thread in collectors)
