"""Score cache: only misses reach the model, results equal the uncached ones, Redis failures.

Redis tests run a real Debian ``redis-server`` on a free loopback port, started and stopped
here; they skip, saying why, where it is not installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from crossrank import Reranker
from crossrank import cache as cache_module
from crossrank.cache import CacheStats, MemoryCache, RedisCache, ScoreCache
from crossrank.fingerprint import model_identity
from crossrank.testing import TINY_CONFIG, build_random_reranker
from tests.conftest import DOCS, QUERY

LONG = " ".join(f"Clause {i} of the contract covers the delivery of goods." for i in range(40))


def _count_rows(monkeypatch: pytest.MonkeyPatch, reranker: Reranker) -> list[int]:
    """Record how many rows each forward pass scores."""
    counts: list[int] = []
    submit = reranker.runner.submit

    def spy(encoded):
        counts.append(len(encoded))
        return submit(encoded)

    monkeypatch.setattr(reranker.runner, "submit", spy)
    return counts


@pytest.fixture(scope="module")
def memory_cache() -> MemoryCache:
    return MemoryCache()


@pytest.fixture(scope="module")
def memory_reranker(tiny_model_dir: Path, memory_cache: MemoryCache) -> Reranker:
    return Reranker(str(tiny_model_dir), device="cpu", cache=memory_cache)


def test_only_misses_reach_the_model_and_scores_equal_uncached(
    memory_reranker, tiny_reranker, monkeypatch
):
    rows = _count_rows(monkeypatch, memory_reranker)
    first = memory_reranker.score(QUERY, DOCS[:3])
    assert sum(rows) == 3
    rows.clear()
    mixed = memory_reranker.score(QUERY, DOCS)  # 3 hits, the rest misses
    assert sum(rows) == len(DOCS) - 3
    rows.clear()
    again = memory_reranker.score(QUERY, DOCS)
    assert rows == []  # all hits: no forward pass at all
    np.testing.assert_array_equal(again, mixed)  # hits return exactly what was computed
    # Misses are scored like uncached pairs: bit-identical for the same batch...
    np.testing.assert_array_equal(first, tiny_reranker.score(QUERY, DOCS[:3]))
    np.testing.assert_array_equal(mixed[3:], tiny_reranker.score(QUERY, DOCS[3:]))
    # ...and, like uncached scores, within fp32 padding rounding across batch compositions.
    uncached = tiny_reranker.score(QUERY, DOCS)
    np.testing.assert_allclose(mixed, uncached, rtol=0, atol=1e-6)
    # raw scores are stored: the per-call normalize override still applies to hits
    np.testing.assert_allclose(
        memory_reranker.score(QUERY, DOCS, normalize=False),
        tiny_reranker.score(QUERY, DOCS, normalize=False),
        rtol=0,
        atol=1e-5,
    )
    assert rows == []
    results = memory_reranker.rerank(QUERY, DOCS)
    assert rows == []
    assert [r.index for r in results] == np.argsort(-again, kind="stable").tolist()
    assert [r.score for r in results] == sorted(again.tolist(), reverse=True)


def test_stats_count_hits_and_misses(memory_reranker):
    docs = [f"{doc} (stats)" for doc in DOCS]
    before = memory_reranker.cache_stats
    memory_reranker.score(QUERY, docs[:2])
    memory_reranker.score(QUERY, docs[:5])
    memory_reranker.score_pairs([(QUERY, docs[0]), ("another query", docs[0])])
    after = memory_reranker.cache_stats
    assert (after.hits - before.hits, after.misses - before.misses) == (2 + 1, 2 + 3 + 1)
    assert (after.errors, after.available) == (0, True)


def test_async_path_uses_the_cache(memory_reranker, monkeypatch):
    rows = _count_rows(monkeypatch, memory_reranker)
    docs = [*DOCS, "Saturn has rings made of ice."]
    sync = memory_reranker.score(QUERY, docs)
    rows.clear()

    async def run():
        return await asyncio.gather(
            memory_reranker.ascore(QUERY, docs), memory_reranker.ascore(QUERY, docs[::-1])
        )

    forward, backward = asyncio.run(run())
    assert rows == []
    np.testing.assert_array_equal(forward, sync)
    np.testing.assert_array_equal(backward, sync[::-1])
    fresh = asyncio.run(memory_reranker.ascore(QUERY, ["Venus is the hottest planet."]))
    assert sum(rows) == 1
    np.testing.assert_array_equal(
        memory_reranker.score(QUERY, ["Venus is the hottest planet."]), fresh
    )
    assert sum(rows) == 1  # the async call stored its score


def test_chunk_mode_caches_scores_and_spans(tiny_model_dir, monkeypatch):
    cached = Reranker(
        str(tiny_model_dir), device="cpu", max_length=64, long_docs="chunk", cache="memory"
    )
    docs = [LONG, DOCS[0], LONG[:500], ""]
    rows = _count_rows(monkeypatch, cached)
    expected = cached.rerank(QUERY, docs)  # all misses: the uncached code path
    assert sum(rows) > len(docs)  # long documents were split into windows
    rows.clear()
    assert cached.rerank(QUERY, docs) == expected  # all hits, spans included
    assert asyncio.run(cached.arerank(QUERY, docs)) == expected
    assert cached.rerank(QUERY, []) == []
    assert rows == []
    spans = {r.index: r.best_span for r in expected}
    assert spans[3] == (0, 0)
    assert 0 < spans[0][1] - spans[0][0] < len(LONG)  # one window of the long document


def test_key_covers_settings_query_and_document_but_not_normalize(
    memory_reranker, memory_cache, tiny_model_dir
):
    shared = memory_cache  # engines can share a Cache object
    docs = [f"{doc} (keys)" for doc in DOCS]
    size = len(shared)
    memory_reranker.score(QUERY, docs)
    assert len(shared) == size + len(docs)
    raw = Reranker(str(tiny_model_dir), device="cpu", cache=shared, normalize=False)
    raw.score(QUERY, docs)
    assert raw.cache_stats.hits == len(docs)
    for settings in ({"max_length": 256}, {"query_max_length": 100}, {"long_docs": "chunk"}):
        other = Reranker(str(tiny_model_dir), device="cpu", cache=shared, **settings)
        other.score(QUERY, docs[:2])
        assert other.cache_stats.hits == 0, settings
    size = len(shared)
    memory_reranker.score(QUERY + "?", docs[:2])
    memory_reranker.score(QUERY, [docs[0] + " "])
    assert len(shared) == size + 3
    # a (query, document) split differently must not collide
    keys = ScoreCache(shared, "model", with_spans=False).keys(["ab", "a"], ["c", "bc"])
    assert keys[0] != keys[1]


def test_a_call_instruction_gets_keys_of_its_own_and_the_default_keeps_its_keys():
    """The key format without an instruction, pinned (a change would invalidate every cache
    in use): blake2b-160 over blake2b-128(fingerprint), the query's byte length (8 bytes,
    little-endian), the query and the document. A call's instruction never shares a key with
    another instruction, none, or the same bytes split differently."""
    cache = ScoreCache(MemoryCache(), "fingerprint", with_spans=False)
    prefix = hashlib.blake2b(b"fingerprint", digest_size=16).digest()
    message = prefix + (5).to_bytes(8, "little") + b"Mars?" + b"Red planet"
    pinned = "crossrank:" + hashlib.blake2b(message, digest_size=20).hexdigest()
    assert cache.keys(["Mars?"], ["Red planet"]) == [pinned]
    assert cache.keys(["Mars?"], ["Red planet"], None) == [pinned]
    variants = [
        cache.keys(["Mars?"], ["Red planet"], instruction)[0]
        for instruction in ("", "Find facts", "Find facts ", "Find")
    ]
    variants += [
        cache.keys([" facts" + "Mars?"], ["Red planet"], "Find")[0],
        cache.keys(["Mars?"], ["Red planet"], "Find facts" + "\x00" * 8)[0],
    ]
    assert len({pinned, *variants}) == 1 + len(variants)


def test_memory_cache_is_bounded():
    lru = MemoryCache(maxsize=3)
    lru.set_many({f"k{i}": bytes([i]) for i in range(5)})
    assert len(lru) == 3
    assert lru.get_many(["k0", "k1", "k4"]) == [None, None, bytes([4])]


def test_bad_cache_specs_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="memcached"):
        Reranker(str(tiny_model_dir), device="cpu", cache="memcached://localhost")
    with pytest.raises(TypeError, match="int"):
        Reranker(str(tiny_model_dir), device="cpu", cache=42)


class _FlakyCache(MemoryCache):
    """A memory cache that fails while ``down`` is set, counting the calls that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def get_many(self, keys):
        self.calls += 1
        if self.down:
            raise ConnectionError("backend unreachable")
        return super().get_many(keys)

    def set_many(self, items):
        self.calls += 1
        if self.down:
            raise ConnectionError("backend unreachable")
        super().set_many(items)


def test_failing_backend_warns_once_backs_off_and_recovers(
    tiny_model_dir, tiny_reranker, caplog, monkeypatch
):
    monkeypatch.setattr(cache_module, "BACKOFF_START", 0.3)
    flaky = _FlakyCache()
    reranker = Reranker(str(tiny_model_dir), device="cpu", cache=flaky)
    reranker.score(QUERY, DOCS)
    flaky.down = True
    calls_before = flaky.calls
    with caplog.at_level(logging.WARNING, logger="crossrank"):
        for _ in range(5):
            scores = reranker.score(QUERY, DOCS[::-1])
            np.testing.assert_allclose(scores, tiny_reranker.score(QUERY, DOCS[::-1]), atol=1e-6)
    assert flaky.calls == calls_before + 1  # later calls skip the backend during the back-off
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "scoring continues without it" in warnings[0].getMessage()
    assert reranker.cache_stats is not None and not reranker.cache_stats.available
    flaky.down = False
    time.sleep(0.35)
    reranker.score(QUERY, ["Saturn has rings."])
    assert reranker.cache_stats.available
    hits = reranker.cache_stats.hits
    reranker.score(QUERY, ["Saturn has rings."])
    assert reranker.cache_stats.hits == hits + 1


# ---------------------------------------------------------------------------------- Redis
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def redis_server() -> Iterator[Callable[..., tuple[str, Callable[[], None]]]]:
    """Start ``redis-server`` processes on free loopback ports; each call returns its URL and
    a function that kills it. All are stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis

    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int | None = None) -> tuple[str, Callable[[], None]]:
        port = port or _free_port()
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.02)
        client.close()

        def kill() -> None:
            process.kill()
            process.wait(timeout=10)

        return f"redis://127.0.0.1:{port}/0", kill

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_redis_cache_is_shared_between_engines_with_a_ttl(
    redis_server, tiny_model_dir, tiny_reranker, monkeypatch
):
    url, _ = redis_server()
    writer = Reranker(str(tiny_model_dir), device="cpu", cache=url)
    reader = Reranker(str(tiny_model_dir), device="cpu", cache=url)  # another "process"
    written = writer.score(QUERY, DOCS)
    rows = _count_rows(monkeypatch, reader)
    read = reader.score(QUERY, DOCS)
    assert rows == []
    assert reader.cache_stats == CacheStats(hits=len(DOCS), misses=0, errors=0, available=True)
    np.testing.assert_array_equal(read, written)
    np.testing.assert_allclose(read, tiny_reranker.score(QUERY, DOCS), atol=1e-6)
    import redis

    client = redis.Redis.from_url(url)
    keys = client.keys("crossrank:*")
    assert len(keys) == len(DOCS)
    assert all(0 < client.ttl(key) <= 86_400 for key in keys)
    assert not any(QUERY.encode() in key for key in keys)  # keys are hashes, not text
    client.close()


def test_redis_url_password_is_not_shown():
    pytest.importorskip("redis")
    cache = RedisCache("redis://user:s3cret@127.0.0.1:6390/2")
    assert "s3cret" not in repr(cache) and "6390/2" in repr(cache)


def test_redis_killed_mid_run(redis_server, tiny_model_dir, tiny_reranker, caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "BACKOFF_START", 0.3)
    url, kill = redis_server()
    backend = RedisCache(url)
    reranker = Reranker(str(tiny_model_dir), device="cpu", cache=backend)
    expected = tiny_reranker.score(QUERY, DOCS)
    np.testing.assert_allclose(reranker.score(QUERY, DOCS), expected, atol=1e-6)
    calls: list[str] = []
    for name in ("get_many", "set_many"):
        method = getattr(backend, name)

        def spy(*args, _method=method, _name=name):
            calls.append(_name)
            return _method(*args)

        monkeypatch.setattr(backend, name, spy)

    kill()
    with caplog.at_level(logging.WARNING, logger="crossrank"):
        for docs in (DOCS, DOCS[::-1], DOCS[2:]):
            scores = reranker.score(QUERY, docs)
            np.testing.assert_allclose(scores, tiny_reranker.score(QUERY, docs), atol=1e-6)
        results = asyncio.run(reranker.arerank(QUERY, DOCS))
        by_index = sorted(results, key=lambda r: r.index)
        np.testing.assert_allclose([r.score for r in by_index], expected, atol=1e-6)
        assert calls == ["get_many"]  # one failed attempt, then the back-off skips Redis
        time.sleep(0.35)  # back-off over: one more attempt, which fails again quietly
        reranker.score(QUERY, DOCS[:2])
        assert calls == ["get_many", "get_many"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "scoring continues without it" in warnings[0].getMessage()
    stats = reranker.cache_stats
    assert stats is not None and stats.errors == 2 and not stats.available

    # Redis comes back on the same port: after the back-off the cache is used again.
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    redis_server(port)
    time.sleep(0.65)
    reranker.score(QUERY, DOCS)  # misses (the new server is empty), stored
    assert reranker.cache_stats.available
    hits = reranker.cache_stats.hits
    np.testing.assert_allclose(reranker.score(QUERY, DOCS), expected, atol=1e-6)
    assert reranker.cache_stats.hits == hits + len(DOCS)


# ------------------------------------------------------------------ model identity (fault 6)
def _replace_weights(model_dir: Path, skeleton_dir: Path, seed: int) -> None:
    """Save another random model of the same architecture over ``model_dir`` (same file
    names and sizes: only the weights' bytes and times change)."""
    build_random_reranker(model_dir, skeleton_dir, seed=seed, **TINY_CONFIG)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_replaced_weights_are_not_answered_from_the_cache(
    backend, redis_server, skeleton_dir, tmp_path, monkeypatch
):
    spec = MemoryCache() if backend == "memory" else redis_server()[0]
    model_dir = build_random_reranker(tmp_path / "model", skeleton_dir, seed=0, **TINY_CONFIG)
    before = Reranker(str(model_dir), device="cpu", cache=spec)
    old = before.score(QUERY, DOCS)
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    _replace_weights(model_dir, skeleton_dir, seed=1)
    assert weights.stat().st_size == size  # the path and the file sizes are unchanged
    after = Reranker(str(model_dir), device="cpu", cache=spec)
    new = after.score(QUERY, DOCS)
    assert after.cache_stats.hits == 0
    np.testing.assert_allclose(new, Reranker(str(model_dir), device="cpu").score(QUERY, DOCS))
    assert not np.allclose(new, old)  # the replaced model really scores differently
    # an unchanged directory is still one identity: a third engine hits every pair
    again = Reranker(str(model_dir), device="cpu", cache=spec)
    np.testing.assert_array_equal(again.score(QUERY, DOCS), new)
    assert again.cache_stats.hits == len(DOCS)


def test_identity_follows_weights_config_and_tokenizer(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, model_dir)
    first = model_identity(str(model_dir))
    assert model_identity(str(model_dir)) == first
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    changed = model_identity(str(model_dir))
    assert changed != first
    config = json.loads((model_dir / "config.json").read_text())
    config["classifier_dropout"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(config))
    assert model_identity(str(model_dir)) not in (first, changed)
    assert model_identity(str(model_dir))["path"] == str(model_dir.resolve())


def test_a_hub_model_is_identified_by_its_resolved_commit(tmp_path):
    """A Hub cache laid out as huggingface_hub writes it: refs/main names the snapshot."""
    repo = tmp_path / "models--org--reranker"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    hub = {"cache_dir": str(tmp_path), "local_files_only": True}
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_identity("org/reranker", hub=hub)
    assert first == {"hub_id": "org/reranker", "revision": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)  # upstream moved on, a new snapshot
    assert model_identity("org/reranker", hub=hub)["revision"] == "b" * 40
    assert model_identity("org/reranker", revision="a" * 40, hub=hub) == first


# -------------------------------------------------------------- a bad cache URL (fault 17)
@pytest.mark.parametrize(
    ("url", "reason"),
    [("redis://user:s3cret@127.0.0.1:99999/0", "Port out of range"), ("redis://:s3cret@h:abc", "")],
)
def test_a_bad_redis_port_is_named_as_the_cache_not_the_model(url, reason, tiny_model_dir):
    pytest.importorskip("redis")
    shown = url.replace("user:s3cret@", "").replace(":s3cret@", "")
    for build in (
        lambda: Reranker(str(tiny_model_dir), device="cpu", cache=url),
        lambda: RedisCache(url),
    ):
        with pytest.raises(
            ValueError, match=re.escape(f"cache URL {shown!r} is not valid")
        ) as info:
            build()
        assert reason in str(info.value) and "s3cret" not in str(info.value)
    assert (
        getattr(_raised(lambda: Reranker(str(tiny_model_dir), cache=url)), "param", None) == "cache"
    )


def _raised(call: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_serve_refuses_a_bad_redis_port_before_loading_the_model(tmp_path):
    pytest.importorskip("fastapi")
    from typer.testing import CliRunner

    from crossrank.cli import app

    url = "redis://user:s3cret@127.0.0.1:99999/0"
    result = CliRunner().invoke(app, ["serve", "-m", str(tmp_path / "no-model"), "--cache", url])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "--cache" in output and "redis://127.0.0.1:99999/0" in output
    assert "s3cret" not in output and "failed to load" not in output
