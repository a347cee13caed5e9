"""Prometheus metrics of one server app.

Each app owns its own ``CollectorRegistry`` (never the process-global one), so several apps
can live in one process (tests, embedding) without duplicate-metric errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crossrank.cache import CacheStats

if TYPE_CHECKING:
    from crossrank.backends.selfcheck import SelfCheck

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ServerMetrics:
    """The server's counters, gauges and histograms, registered in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # the process's standard metrics, as prometheus_client's global registry has them:
        # CPU seconds, memory and open files (Linux), the Python version, and garbage
        # collections by generation (a full one stops every thread while it runs)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.requests = Counter(
            "crossrank_http_requests",
            "HTTP requests by route and status code (499: client disconnected).",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "crossrank_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "crossrank_http_requests_in_flight",
            "HTTP requests being handled.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "crossrank_queue_depth_pairs",
            "Pairs waiting in the micro-batching queue, not yet sent to the model.",
            registry=self.registry,
        )
        self.batch_pairs = Histogram(
            "crossrank_batch_pairs",
            "Pairs per forward pass.",
            buckets=_PAIR_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "crossrank_batch_tokens",
            "Tokens computed per forward pass (padding included unless packed).",
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.pairs_scored = Counter(
            "crossrank_pairs_scored",
            "(query, document) pairs scored by the model.",
            registry=self.registry,
        )
        self.nonfinite_scores = Counter(
            "crossrank_nonfinite_scores",
            "Scores the model returned as NaN or infinite (each failed its request with a 424).",
            registry=self.registry,
        )
        self.ready = Gauge(
            "crossrank_model_ready",
            "1 once the model is loaded and warmed up.",
            registry=self.registry,
        )
        self._cache = _CacheCollector()
        self.registry.register(self._cache)
        self._fast_path = _FastPathCollector()
        self.registry.register(self._fast_path)

    def observe_batch(self, pairs: int, tokens: int) -> None:
        """Subscribed to the engine (:meth:`Reranker.subscribe`): called after every forward pass."""
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(tokens)
        self.pairs_scored.inc(pairs)

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth`` at every scrape."""
        self.queue_depth.set_function(depth)

    def track_cache(self, stats: Callable[[], CacheStats | None]) -> None:
        """Read the engine's score-cache counters from ``stats`` at every scrape (no cache
        metrics are exposed while it returns ``None``)."""
        self._cache.stats = stats

    def track_fast_path(self, check: SelfCheck | None, rescored: Callable[[], int]) -> None:
        """Expose the fast path's self-check at load (nothing while ``check`` is ``None``) and
        read the count of passes rescored in float32 from ``rescored`` at every scrape."""
        self._fast_path.check = check
        self._fast_path.rescored = rescored

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """The engine's :class:`CacheStats`, read at scrape time: the engine owns the counters,
    so they are exposed as they are rather than mirrored into client-side counters."""

    def __init__(self) -> None:
        self.stats: Callable[[], CacheStats | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        for name, value, text in (
            ("hits", stats.hits, "Pairs answered by the score cache."),
            ("misses", stats.misses, "Pairs looked up in the score cache and sent to the model."),
            ("errors", stats.errors, "Failed score-cache backend calls."),
        ):
            yield CounterMetricFamily(f"crossrank_cache_{name}", text, value=value)
        yield GaugeMetricFamily(
            "crossrank_cache_available",
            "1 while the score cache is used, 0 while it is skipped after a failure.",
            value=int(stats.available),
        )


class _FastPathCollector(Collector):
    """The engine's fast-path self-check and float32 rescue count, read at scrape time."""

    def __init__(self) -> None:
        self.check: SelfCheck | None = None
        self.rescored: Callable[[], int] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.rescored is not None:
            yield CounterMetricFamily(
                "crossrank_rescored_batches",
                "float16/bfloat16 forward passes with non-finite logits rescored in float32.",
                value=self.rescored(),
            )
        check = self.check
        if check is None:
            return
        yield GaugeMetricFamily(
            "crossrank_fast_path_self_check_passed",
            "1 if the fast runner matched the reference on the probe set at load, 0 if the "
            "server fell back to the reference runner.",
            value=int(check.passed),
        )
        yield GaugeMetricFamily(
            "crossrank_fast_path_max_abs_diff",
            "Largest |fast - reference| raw-score difference on the probe set at load "
            "(+Inf for a non-finite score).",
            value=check.max_abs_diff,
        )
        yield GaugeMetricFamily(
            "crossrank_fast_path_tolerance",
            "The difference the self-check accepts for the model's dtype.",
            value=check.tolerance,
        )
