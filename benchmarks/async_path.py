"""The engine's async path (what the server awaits) against the in-process call, on any machine.

A lone 1 query x D documents request is scored by ``Reranker.score`` and by
``Reranker.ascore_raw`` on an event loop, calls alternating, with the real tokenizer and a
stand-in device: a pass takes ``tokens / --device-rate`` seconds of wall time, off the GIL,
one pass at a time in submission order (as a GPU stream runs them), and costs
``--submit-ms`` of Python time to launch. The default rate is the H200's on
bge-reranker-v2-m3 (11.6 ms for a 1x50 XQuAD-R pass, ``docs/gpu-fast-path.md``), so the
tokenize-while-scoring overlap and every hand-over between threads weigh as on the GPU, and
what the async path adds shows as the ratio of the two p50s. The engine takes its packed
runner's path (chunks tokenized while earlier ones are scored).

Example::

    CROSSRANK_SHARED=../shared PYTHONPATH=src python benchmarks/async_path.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import workload
from crossrank import Reranker
from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, shared_dir
from crossrank.tokenization import EncodedPairs


class TimedDevice:
    """A runner whose passes take wall time in proportion to their tokens, one after the
    other, without holding the GIL; ``packed`` so that the engine overlaps tokenization."""

    packed = True

    def __init__(self, tokens_per_s: float, submit_s: float) -> None:
        self.tokens_per_s = tokens_per_s
        self.submit_s = submit_s
        self._free_at = 0.0
        self._lock = threading.Lock()

    def submit(self, encoded: EncodedPairs) -> Callable[[], np.ndarray]:
        start = time.perf_counter()
        while time.perf_counter() - start < self.submit_s:  # launching holds the GIL
            pass
        with self._lock:
            begin = max(time.perf_counter(), self._free_at)
            self._free_at = done = begin + encoded.total_tokens / self.tokens_per_s
        logits = encoded.lengths.astype(np.float32)[:, None]

        def result() -> np.ndarray:
            time.sleep(max(0.0, done - time.perf_counter()))
            return logits

        return result

    def run(self, encoded: EncodedPairs) -> np.ndarray:
        return self.submit(encoded)()


#: Tokens/s of bge-reranker-v2-m3's 1x50 XQuAD-R pass on one H200 (9,574 tokens in 11.6 ms).
H200_TOKENS_PER_S = 9574 / 0.0116


def stand_in_engine(device: TimedDevice, **options: Any) -> Reranker:
    """A CPU engine of the tiny random model with the real tokenizer (``options`` as for
    :class:`Reranker`), its model replaced by ``device``."""
    shared = shared_dir()
    if shared is None:
        raise SystemExit("needs ../shared (or $CROSSRANK_SHARED) for the real tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_reranker(Path(tmp) / "tiny", shared / SKELETON, **TINY_CONFIG)
        reranker = Reranker(str(model), device="cpu", **options)
    for worker in reranker._devices.workers:
        worker.runner = device  # type: ignore[assignment]
    reranker.runner = device  # type: ignore[assignment]
    return reranker


def p50s(reranker: Reranker, work: list[tuple[str, list[str]]], rounds: int) -> tuple[float, float]:
    """p50 (ms) of ``score`` and of ``ascore_raw``, calls alternating (first 10 of each left out)."""
    sync: list[float] = []
    asynchronous: list[float] = []

    async def run() -> None:
        for _ in range(rounds):
            for query, docs in work:
                start = time.perf_counter()
                reranker.score(query, docs)
                sync.append(time.perf_counter() - start)
                start = time.perf_counter()
                await reranker.ascore_raw(query, docs)
                asynchronous.append(time.perf_counter() - start)

    asyncio.run(run())
    return float(np.median(sync[10:])) * 1000, float(np.median(asynchronous[10:])) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=50, help="Documents per request.")
    parser.add_argument("--requests", type=int, default=30, help="Distinct requests per round.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device-rate", type=float, default=H200_TOKENS_PER_S, help="Tokens/s.")
    parser.add_argument("--submit-ms", type=float, default=0.5, help="Python time per launch.")
    args = parser.parse_args()
    reranker = stand_in_engine(TimedDevice(args.device_rate, args.submit_ms / 1000))
    sync_ms, async_ms = p50s(reranker, workload(args.requests, args.docs, 0), args.rounds)
    reranker.close()
    report = {"score_p50_ms": round(sync_ms, 2), "ascore_raw_p50_ms": round(async_ms, 2)}
    print(json.dumps({**report, "async_to_sync": round(async_ms / sync_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
