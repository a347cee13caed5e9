"""Score cache: repeated (query, document) pairs skip the model.

RAG pipelines rerank the same popular documents for the same or repeated queries over and
over. A cache entry is the pair's *raw* score (so the per-call ``normalize`` override still
applies) and, in chunk mode, its best span. Keys hash everything that changes a score: the
model id, revision and dtype, the length limits, the long-document settings, a decoder
prompt's family and instruction (a call's own instruction too), the query and the document
(blake2b, so no text is stored in the cache server).

Backends implement the two-method :class:`Cache` protocol: :class:`MemoryCache` (an
in-process LRU from ``cachetools``) and :class:`RedisCache` (shared by several server
processes, entries expire after a TTL). :class:`ScoreCache` wraps a backend for the engine:
it counts hits and misses, and when the backend fails it logs one warning, lets scoring go
on without it, and retries only after a growing back-off so no call stalls on a dead server.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from crossrank.errors import require_extra

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Seconds a failed backend is left alone before the first retry; doubled on each failure.
BACKOFF_START = 1.0
#: Longest wait between retries of a failed backend.
BACKOFF_MAX = 30.0

#: Hashed where a key's query length would be when a per-call instruction follows.
_INSTRUCTION_MARK = (2**64 - 1).to_bytes(8, "little")

_SCORE = struct.Struct("<f")
_SCORE_SPAN = struct.Struct("<fqq")


@runtime_checkable
class Cache(Protocol):
    """A key-value store for packed scores. Keys are ``str``, values small ``bytes``."""

    def get_many(self, keys: Sequence[str]) -> Sequence[bytes | None]:
        """The value of each key, ``None`` where absent, in ``keys`` order."""
        ...

    def set_many(self, items: Mapping[str, bytes]) -> None:
        """Store every item."""
        ...


class MemoryCache:
    """In-process LRU cache holding at most ``maxsize`` entries (a few hundred bytes each)."""

    def __init__(self, maxsize: int = 100_000) -> None:
        cachetools = require_extra("cachetools", "cache", feature="cache='memory'")
        self._lru: MutableMapping[str, bytes] = cachetools.LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe

    def __len__(self) -> int:
        return len(self._lru)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            return [self._lru.get(key) for key in keys]

    def set_many(self, items: Mapping[str, bytes]) -> None:
        with self._lock:
            self._lru.update(items)


class RedisCache:
    """Redis-backed cache shared by several processes; entries expire after ``ttl`` seconds.

    The client fails fast (``timeout`` seconds, no built-in retries): :class:`ScoreCache`
    decides when to try a failed server again.
    """

    def __init__(self, url: str, *, ttl: int | None = 86_400, timeout: float = 1.0) -> None:
        redis = require_extra("redis", "cache", feature="a redis:// cache")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
            raise ValueError(f"ttl must be a positive int (seconds) or None, got {ttl!r}")
        self.ttl = ttl
        check_cache(url)
        parts = urlsplit(url)
        # Never keep (or log) the password that the URL may carry.
        self._where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as err:
            raise ValueError(f"cache URL {_without_password(url)!r} is not valid: {err}") from None

    def __repr__(self) -> str:
        return f"RedisCache({self._where!r}, ttl={self.ttl})"

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return cast("list[bytes | None]", self._client.mget(list(keys)))

    def set_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=self.ttl)
        pipe.execute()


_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_cache(spec: object) -> None:
    """Raise the error :func:`open_cache` would raise for ``spec``, opening nothing (so a
    command line can refuse a bad value before loading a model). A refused string is shown
    without the ``user:password@`` part a URL may carry."""
    if spec is None or isinstance(spec, Cache):
        return
    if isinstance(spec, str):
        if spec == "memory":
            return
        if spec.startswith(_URL_SCHEMES):
            _check_url(spec)
            return
        raise ValueError(
            "cache must be None, 'memory', a redis:// URL or a Cache object "
            f"(with get_many/set_many), got the string {spec.split('@')[-1]!r}"
        )
    raise TypeError(
        "cache must be None, 'memory', a redis:// URL or a Cache object "
        f"(with get_many/set_many), got {type(spec).__name__}"
    )


def _check_url(url: str) -> None:
    """Refuse a URL whose port is not a number in 0-65535, naming the URL (a bad port
    otherwise surfaces only when the engine is built, as a bare "Port out of range")."""
    try:
        urlsplit(url).port  # noqa: B018 - parsing the port is the check
    except ValueError as err:
        raise ValueError(f"cache URL {_without_password(url)!r} is not valid: {err}") from None


def _without_password(url: str) -> str:
    """``url`` without the ``user:password@`` part it may carry."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def open_cache(spec: str | Cache | None) -> Cache | None:
    """``None``, ``"memory"``, a ``redis://``/``rediss://``/``unix://`` URL, or a
    :class:`Cache` object."""
    check_cache(spec)
    if spec == "memory":
        return MemoryCache()
    if isinstance(spec, str):
        return RedisCache(spec)
    return spec


@dataclass(frozen=True)
class CacheStats:
    """Counters since the engine started: pairs answered from the cache (``hits``), pairs
    sent to the model (``misses``, which include pairs looked up while the backend was
    down) and failed backend calls (``errors``). ``available`` is False while the backend
    is being skipped after a failure."""

    hits: int
    misses: int
    errors: int
    available: bool


class ScoreCache:
    """The engine's view of a :class:`Cache`: keys, packing, counters and failure handling."""

    def __init__(self, backend: Cache, fingerprint: str, *, with_spans: bool) -> None:
        self.backend = backend
        self._prefix = hashlib.blake2b(fingerprint.encode(), digest_size=16).digest()
        self._with_spans = with_spans
        self._lock = threading.Lock()
        self._hits = self._misses = self._errors = 0
        self._retry_at = 0.0  # monotonic time before which a failed backend is skipped
        self._backoff = 0.0  # 0 while healthy

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._errors, self._backoff == 0.0)

    def keys(
        self, queries: Sequence[str], documents: Sequence[str], instruction: str | None = None
    ) -> list[str]:
        """One key per pair; the query is length-prefixed so (q, d) pairs cannot collide.

        ``instruction`` is a call's decoder-prompt instruction other than the one the
        fingerprint holds (``None``: that one, with the keys it always had). It is hashed
        ahead of the query as :data:`_INSTRUCTION_MARK` (where a key without one has its
        query's length, which can never be 2**64 - 1 bytes), then its length and bytes: each
        hashed message still reads back one way only, so no two (instruction, query,
        document) triples share one.
        """
        head = hashlib.blake2b(self._prefix, digest_size=20)
        if instruction is not None:
            encoded = instruction.encode("utf-8", "surrogatepass")
            head.update(_INSTRUCTION_MARK + len(encoded).to_bytes(8, "little") + encoded)
        out = []
        for query, document in zip(queries, documents, strict=True):
            digest = head.copy()
            encoded_query = query.encode("utf-8", "surrogatepass")
            digest.update(len(encoded_query).to_bytes(8, "little"))
            digest.update(encoded_query)
            digest.update(document.encode("utf-8", "surrogatepass"))
            out.append("crossrank:" + digest.hexdigest())
        return out

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(hit mask, raw scores, spans)``; entries of misses are meaningless."""
        values = self._guard(lambda: self.backend.get_many(keys), None)
        n = len(keys)
        hit = np.zeros(n, dtype=bool)
        raw = np.zeros(n, dtype=np.float32)
        spans = np.zeros((n, 2), dtype=np.int64) if self._with_spans else None
        if values is not None:
            if len(values) != n:
                raise RuntimeError(f"cache returned {len(values)} values for {n} keys")
            for i, value in enumerate(values):
                if value is None:
                    continue
                hit[i] = True
                if spans is None:
                    (raw[i],) = _SCORE.unpack(value)
                else:
                    raw[i], spans[i, 0], spans[i, 1] = _SCORE_SPAN.unpack(value)
        hits = int(hit.sum())
        with self._lock:
            self._hits += hits
            self._misses += n - hits
        return hit, raw, spans

    def put(self, keys: Sequence[str], raw: np.ndarray, spans: np.ndarray | None) -> None:
        """Store the scores (and spans) of freshly scored pairs."""
        if spans is None:
            items = {k: _SCORE.pack(float(s)) for k, s in zip(keys, raw.tolist(), strict=True)}
        else:
            items = {
                k: _SCORE_SPAN.pack(float(s), int(a), int(b))
                for k, s, (a, b) in zip(keys, raw.tolist(), spans.tolist(), strict=True)
            }
        self._guard(lambda: self.backend.set_many(items), None)

    def _guard(self, call: Callable[[], _T], fallback: _T) -> _T:
        """Run ``call``; on failure warn once per outage and skip the backend for a while."""
        with self._lock:
            if time.monotonic() < self._retry_at:
                return fallback
        try:
            result = call()
        except Exception as err:  # any backend failure: score without the cache
            with self._lock:
                first = self._backoff == 0.0
                self._errors += 1
                self._backoff = BACKOFF_START if first else min(self._backoff * 2, BACKOFF_MAX)
                self._retry_at = time.monotonic() + self._backoff
            if first:
                logger.warning(
                    "score cache %r failed (%s: %s); scoring continues without it and "
                    "retries with back-off",
                    self.backend,
                    type(err).__name__,
                    err,
                )
            return fallback
        with self._lock:
            recovered = self._backoff != 0.0
            self._backoff = 0.0
        if recovered:
            logger.info("score cache %r is reachable again", self.backend)
        return result
