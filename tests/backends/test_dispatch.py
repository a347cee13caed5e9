"""Spreading a call over time (tokenize while scoring) and over devices (replicas)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from crossrank import Reranker
from crossrank.backends.workers import (
    assign_batches,
    chunk_sizes,
    run_on_devices,
    score_overlapped,
    tokenize_ahead,
)


@pytest.mark.parametrize("n", [1, 15, 16, 20, 24, 50, 100, 129, 300, 2000, 5001])
def test_chunk_sizes_cover_every_pair(n: int) -> None:
    sizes = chunk_sizes(n, 16, 256)
    assert sum(sizes) == n
    assert all(s > 0 for s in sizes)
    assert sizes[0] <= 24  # the first chunk stays small (up to 16 plus a merged tail)
    assert all(s <= 384 for s in sizes)  # at most the largest chunk plus a merged tail
    if len(sizes) > 1:
        assert sizes[-1] >= min(8, n)


def test_score_overlapped_keeps_order_and_tokenizes_off_thread() -> None:
    queries = [f"q{i}" for i in range(100)]
    docs = [f"d{i}" for i in range(100)]
    threads: list[str] = []

    def encode(qs, ds):
        threads.append(threading.current_thread().name)
        return [int(d[1:]) for d in ds]

    queued: list[int] = []

    def submit(encoded):  # queues now, computes when the result is asked for
        queued.append(len(encoded))
        return lambda: np.asarray(encoded, dtype=np.float32) * 2

    with ThreadPoolExecutor(1, thread_name_prefix="tok") as pool:
        out = score_overlapped(encode, submit, queries, docs, [16, 64, 20], pool)
        with pytest.raises(ValueError, match="add up to 99"):
            score_overlapped(encode, submit, queries, docs, [16, 83], pool)
    np.testing.assert_array_equal(out, np.arange(100, dtype=np.float32) * 2)
    # the first chunk on the calling thread, the others while the previous one is queued
    assert threads[0] == threading.current_thread().name
    assert len(threads) >= 3 and all(name.startswith("tok") for name in threads[1:3])
    assert queued == [16, 64, 20]


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_score_overlapped_tokenizes_ahead_while_queueing_waits(ahead: int) -> None:
    """Queueing a chunk can wait (the device holds its limit of passes): meanwhile the next
    ``ahead`` chunks are tokenized, and no more (each waits for a chunk to be queued)."""
    docs = [str(i) for i in range(24)]
    encoded: list[int] = []
    changed = threading.Condition()
    seen_while_first_waits: list[int] = []

    def encode(qs, ds):
        with changed:
            encoded.append(int(ds[0]) // 4)
            changed.notify_all()
        return [int(d) for d in ds]

    def submit(chunk):
        if not seen_while_first_waits:  # the device is full: wait for the tokenizer
            with changed:
                changed.wait_for(lambda: len(encoded) >= 1 + ahead, timeout=10)
            time.sleep(0.05)  # time for a chunk too many to start
            seen_while_first_waits.append(len(encoded))
        return lambda: np.asarray(chunk, dtype=np.float32)

    with ThreadPoolExecutor(4) as pool:
        out = score_overlapped(encode, submit, ["q"] * 24, docs, [4] * 6, pool, ahead=ahead)
    np.testing.assert_array_equal(out, np.arange(24, dtype=np.float32))
    assert seen_while_first_waits == [1 + ahead]
    assert sorted(encoded) == list(range(6))


@pytest.mark.parametrize(("setting", "ahead"), [("false", 2), ("true", 1)])
def test_two_chunks_ahead_only_where_crossranks_threads_tokenize(
    monkeypatch: pytest.MonkeyPatch, setting: str, ahead: int
) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
    assert tokenize_ahead() == ahead


def test_assign_batches_balances_tokens() -> None:
    costs = [900, 100, 500, 500, 300, 200]
    groups = assign_batches(costs, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    loads = [sum(costs[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 100


def test_run_on_devices_writes_every_row_once(tiny_reranker) -> None:
    encoded = tiny_reranker.encode(["q"] * 7, [f"document {i} " * (i + 1) for i in range(7)])
    calls: list[tuple[int, int]] = []

    def submit_for(device: int):
        def submit(part):
            calls.append((device, len(part)))
            return lambda: part.lengths.astype(np.float32)

        return submit

    batches = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5]), np.array([6])]
    with ThreadPoolExecutor(2) as pool:
        out = run_on_devices([submit_for(0), submit_for(1)], encoded, batches, pool)
    np.testing.assert_array_equal(out, encoded.lengths.astype(np.float32))
    assert {d for d, _ in calls} == {0, 1}
    assert sum(n for _, n in calls) == 7


def test_several_devices_score_like_one(tiny_model_dir, tiny_reranker, xquad) -> None:
    docs = [it["context"] for it in xquad["questions"][:40]]
    query = xquad["questions"][1]["question"]
    split = Reranker(str(tiny_model_dir), device=["cpu", "cpu"], split_tokens=64)
    workers = split._devices.workers
    assert len(workers) == 2
    assert workers[0].runner.model is not workers[1].runner.model  # one copy per device
    forwards: list[int] = []
    for worker in workers:
        original = worker.submit

        def counting(encoded, original=original, worker=worker):
            forwards.append(id(worker))
            return original(encoded)

        worker.submit = counting  # type: ignore[method-assign]
    got = split.score(query, docs, normalize=False)
    want = tiny_reranker.score(query, docs, normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert len(set(forwards)) == 2, "both replicas scored part of the call"
    forwards.clear()
    split.score(query, docs[:1])  # below split_tokens: one device, no split
    assert len(set(forwards)) == 1
    split.close()


def test_device_options_are_checked(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        Reranker(str(tiny_model_dir), device=[])
    with pytest.raises(ValueError, match="split_tokens must be a positive int"):
        Reranker(str(tiny_model_dir), device="cpu", split_tokens=0)
