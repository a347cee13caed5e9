"""Dynamic batching through the real server: concurrent requests share forward passes and
each gets its own results in its own order; a big request does not starve small ones; a
cancelled or timed-out request's pairs never reach the model; a full queue is a 429; a failing
forward pass is a 500 and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx
import numpy as np
import pytest

from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer
from tests.server.helpers import SpyReranker, metric, wait_until

pytestmark = pytest.mark.timeout(300)

QUERY = "Which planet is known as the red planet?"


@pytest.fixture(scope="module")
def spy(tiny_model_dir):
    r = SpyReranker(str(tiny_model_dir), device="cpu")
    yield r
    r.close()


@pytest.fixture(scope="module")
def pool(xquad) -> list[str]:
    texts = {t for item in xquad["questions"] for t in (item["question"], item["context"])}
    return sorted(t[:120] for t in texts)


@contextlib.contextmanager
def serving(spy: SpyReranker, *, batch_tokens: int = 8192, **settings):
    """A fresh server (its own event loop, so a fresh queue) around the shared reranker."""
    spy.batch_tokens = batch_tokens  # read when the server's queue is created
    with BackgroundServer(create_app(spy, ServerSettings(**settings))) as srv:
        srv.wait_ready()
        spy.reset()
        yield srv
        spy.reset()


def docs_of(n: int, tag: str = "") -> list[str]:
    return [f"{tag} document number {i} about planets, moons and iron oxide." for i in range(n)]


def check(spy: SpyReranker, query: str, docs: list[str], response: httpx.Response) -> None:
    """The response ranks every document with the engine's own scores for these inputs
    (computed through ``spy.forward``, so count the server's passes before calling this)."""
    assert response.status_code == 200, response.text
    body = response.json()
    items = body if isinstance(body, list) else body["results"]
    key = "score" if isinstance(body, list) else "relevance_score"
    want = spy.score(query, docs)
    assert sorted(x["index"] for x in items) == list(range(len(docs)))
    for item in items:
        assert item[key] == pytest.approx(float(want[item["index"]]), abs=1e-5)
    scores = [x[key] for x in items]
    assert scores == sorted(scores, reverse=True)


async def test_64_concurrent_mixed_size_requests(spy, pool):
    rng = random.Random(0)
    sizes = [rng.choice([1, 2, 5, 10, 20, 40]) for _ in range(64)]
    cases = []
    for i, k in enumerate(sizes):
        query = rng.choice(pool)
        docs = rng.sample(pool, k)
        if i % 4 == 3:
            cases.append(("/rerank", {"query": query, "texts": docs}, query, docs))
        else:
            path = ("/v1/rerank", "/v2/rerank", "/rerank")[i % 4]
            cases.append((path, {"query": query, "documents": docs}, query, docs))
    with serving(spy) as srv:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
            responses = await asyncio.gather(*(client.post(p, json=b) for p, b, _, _ in cases))
        batches = list(spy.batches)
    for (_, _, query, docs), response in zip(cases, responses, strict=True):
        check(spy, query, docs, response)
    assert sum(batches) == sum(sizes)  # every pair scored once
    assert len(batches) < len(cases)  # forward passes were shared between requests


async def test_small_requests_are_not_starved_by_a_big_one(spy):
    with serving(spy, batch_tokens=512) as srv:
        spy.delay = 0.05
        big_docs = docs_of(300, "big")
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:

            async def timed(docs: list[str]) -> tuple[httpx.Response, float]:
                r = await client.post("/v2/rerank", json={"query": QUERY, "documents": docs})
                return r, time.monotonic()

            big = asyncio.ensure_future(timed(big_docs))
            while not spy.batches:  # the big request is being scored
                await asyncio.sleep(0.005)
            smalls = [docs_of(5, f"small {j}") for j in range(6)]
            small_results = await asyncio.gather(*(timed(d) for d in smalls))
            assert not big.done()
            big_response, big_done = await big
    check(spy, QUERY, big_docs, big_response)
    for docs, (response, done) in zip(smalls, small_results, strict=True):
        check(spy, QUERY, docs, response)
        assert done < big_done


async def test_cancelled_request_pairs_never_reach_the_model(spy):
    with serving(spy, batch_tokens=512) as srv:
        spy.delay = 0.1
        docs = docs_of(300)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            task = asyncio.ensure_future(
                client.post("/v2/rerank", json={"query": QUERY, "documents": docs})
            )
            while not spy.batches:
                await asyncio.sleep(0.005)
            task.cancel()  # the client goes away: httpx closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await task

        def scrape() -> str:
            return httpx.get(srv.url + "/metrics").text

        wait_until(
            lambda: (
                metric(scrape(), "crossrank_http_requests_total", route="/v2/rerank", status="499")
                == 1
            ),
            what="a 499",
        )
        seen = spy.pairs_seen
        time.sleep(0.5)
        assert spy.pairs_seen == seen < len(docs) / 2
        assert metric(scrape(), "crossrank_queue_depth_pairs") == 0
        spy.delay = 0
        ok = httpx.post(srv.url + "/v2/rerank", json={"query": QUERY, "documents": docs[:3]})
        check(spy, QUERY, docs[:3], ok)


async def test_full_queue_is_429_with_retry_after(spy):
    with serving(spy, batch_tokens=512, max_docs=100, max_queue=120) as srv:
        spy.delay = 0.3
        first_docs = docs_of(100)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            first = asyncio.ensure_future(
                client.post("/v2/rerank", json={"query": QUERY, "documents": first_docs})
            )
            while not spy.batches:
                await asyncio.sleep(0.005)
            refused = await client.post("/rerank", json={"query": QUERY, "texts": docs_of(100)})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert "server busy" in refused.json()["message"]
            first_response = await first
            assert spy.pairs_seen == len(first_docs)  # nothing of the refused one was scored
        check(spy, QUERY, first_docs, first_response)


async def test_timeout_is_504_and_drops_the_pending_pairs(spy):
    with serving(spy, batch_tokens=512, request_timeout=0.5) as srv:
        spy.delay = 0.2
        docs = docs_of(200)
        r = httpx.post(srv.url + "/v2/rerank", json={"query": QUERY, "documents": docs}, timeout=60)
        assert r.status_code == 504
        assert "limit of 0.5 s" in r.json()["message"]
        time.sleep(0.5)
        seen = spy.pairs_seen
        time.sleep(0.5)
        assert spy.pairs_seen == seen < len(docs)


async def test_failing_forward_is_500_and_the_server_keeps_serving(spy):
    with serving(spy) as srv:
        spy.fail = True
        r = httpx.post(srv.url + "/v2/rerank", json={"query": QUERY, "documents": docs_of(3)})
        assert r.status_code == 500
        assert "internal server error" in r.json()["message"]
        assert "injected" not in r.text  # internals stay in the log
        spy.fail = False
        docs = docs_of(4)
        check(
            spy, QUERY, docs, httpx.post(srv.url + "/rerank", json={"query": QUERY, "texts": docs})
        )
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "crossrank_http_requests_total", route="/v2/rerank", status="500") == 1
        assert np.isclose(metric(text, "crossrank_pairs_scored_total"), 4)
