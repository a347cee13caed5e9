"""Shared pieces of the server tests: a reranker that records (and can slow or fail) its
forward passes, a Prometheus text parser, and other-than-default setting values."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from crossrank import Reranker
from crossrank.tokenization import EncodedPairs


class SpyReranker(Reranker):
    """A real reranker that records every forward pass; ``delay`` slows each pass and
    ``fail`` makes passes raise, so tests can hold work in the queue or break a request."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = 0.0
        self.fail = False
        self.batches: list[int] = []
        self.lock = threading.Lock()
        worker = self._devices.workers[0]  # where every path's forward passes are queued
        submit = worker.submit

        def spied(encoded: EncodedPairs):
            with self.lock:
                self.batches.append(len(encoded))
            if self.delay:
                time.sleep(self.delay)
            if self.fail:
                raise RuntimeError("injected failure")
            return submit(encoded)

        worker.submit = spied  # type: ignore[method-assign]

    @property
    def pairs_seen(self) -> int:
        with self.lock:
            return sum(self.batches)

    def reset(self) -> None:
        with self.lock:
            self.batches.clear()
        self.delay = 0.0
        self.fail = False


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in a Prometheus exposition (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def other_setting_value(default):
    """A valid server setting other than ``default``, as a command line writes it, and as
    parsed (for checking that each generated flag reaches the settings)."""
    if default is None:  # the API key
        return "sk-test-key", "sk-test-key"
    if isinstance(default, tuple):
        return "alias", ("alias",)
    return str(default + 1), default + 1
