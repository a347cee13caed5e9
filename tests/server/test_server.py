"""The HTTP API on a real uvicorn server (loopback, free port, tiny random model), driven with
httpx and with the official cohere SDK: both body shapes, every error status, auth, readiness,
/metrics. Expected scores always come from the engine's own synchronous ``Reranker.score``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import uuid

import cohere
import httpx
import numpy as np
import pytest

from crossrank import Reranker
from crossrank.loading import ModelLoadError
from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer
from tests.conftest import DOCS, QUERY
from tests.server.helpers import metric, wait_until

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-" + uuid.uuid4().hex
MAX_DOCS = 50
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def reranker(tiny_model_dir):
    """Its own instance: the app hooks its batch observer for the metrics."""
    r = Reranker(str(tiny_model_dir), device="cpu")
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(reranker):
    settings = ServerSettings(max_docs=MAX_DOCS, max_queue=1000, max_body_bytes=MAX_BODY)
    with BackgroundServer(create_app(reranker, settings)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def auth_server(tiny_reranker):
    with BackgroundServer(create_app(tiny_reranker, ServerSettings(api_key=KEY))) as srv:
        srv.wait_ready()
        yield srv


def served(reranker) -> str:
    """The name the server reports: a local directory's base name, never its path."""
    return os.path.basename(reranker.model_name)


def post(srv, path: str, body, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60, **kw)


def expected(reranker, docs=DOCS, **kw) -> np.ndarray:
    return reranker.score(QUERY, docs, **kw)


def assert_best_first(scores: list[float]) -> None:
    assert scores == sorted(scores, reverse=True)


# ------------------------------------------------------------------------ Cohere / Jina shape
@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_shape_scores_order_and_usage(server, reranker, path):
    r = post(server, path, {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    uuid.UUID(body["id"])
    assert body["model"] == served(reranker)
    want = expected(reranker)
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    for item in results:
        assert set(item) == {"index", "relevance_score"}
        assert item["relevance_score"] == pytest.approx(float(want[item["index"]]), abs=1e-5)
    assert_best_first([x["relevance_score"] for x in results])
    tokens = reranker.encode([QUERY] * len(DOCS), DOCS).total_tokens
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_document_objects_top_n_documents_and_raw_scores(server, reranker):
    body = {
        "query": QUERY,
        "documents": [{"text": d, "title": "ignored"} for d in DOCS],
        "top_n": 3,
        "return_documents": True,
        "return_raw_scores": True,
    }
    results = post(server, "/v2/rerank", body).json()["results"]
    raw = expected(reranker, normalize=False)
    assert [x["index"] for x in results] == list(np.argsort(-raw, kind="stable")[:3])
    for item in results:
        assert item["document"] == {"text": DOCS[item["index"]]}
        assert item["raw_score"] == pytest.approx(float(raw[item["index"]]), abs=1e-4)
        assert item["relevance_score"] == pytest.approx(1 / (1 + np.exp(-item["raw_score"])))


def test_top_n_above_document_count_returns_all(server):
    results = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS[:2], "top_n": 9})
    assert len(results.json()["results"]) == 2


def test_max_tokens_per_doc(server, reranker):
    body = {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 4}
    got = post(server, "/v2/rerank", body).json()
    want = expected(reranker, max_doc_tokens=4)
    for item in got["results"]:
        assert item["relevance_score"] == pytest.approx(float(want[item["index"]]), abs=1e-5)
    full = reranker.encode([QUERY] * len(DOCS), DOCS).total_tokens
    assert got["usage"]["total_tokens"] < full


def test_unknown_fields_and_null_options(server):
    body = {"query": QUERY, "documents": DOCS, "priority": 0, "relevant_spans": None, "x": [1]}
    assert post(server, "/v2/rerank", body).status_code == 200
    # a Jina-style body: explicit nulls, documents back
    jina = {
        "model": "jina-reranker-v2",
        "query": QUERY,
        "documents": DOCS,
        "top_n": None,
        "return_documents": True,
    }
    results = post(server, "/v1/rerank", jina).json()["results"]
    assert [x["document"]["text"] for x in results] == [DOCS[x["index"]] for x in results]
    assert len(results) == len(DOCS)


# ---------------------------------------------------------------------------------- TEI shape
def test_tei_shape(server, reranker):
    got = post(server, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert isinstance(got, list) and len(got) == len(DOCS)
    want = expected(reranker)
    for item in got:
        assert set(item) == {"index", "score"}
        assert item["score"] == pytest.approx(float(want[item["index"]]), abs=1e-5)
    assert_best_first([x["score"] for x in got])

    raw = post(
        server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    ).json()
    want_raw = expected(reranker, normalize=False)
    for item in raw:
        assert item["score"] == pytest.approx(float(want_raw[item["index"]]), abs=1e-4)
        assert item["text"] == DOCS[item["index"]]
    assert [x["index"] for x in raw] == [x["index"] for x in got]


def test_tei_truncate_false_refuses_overlong_pairs(server, reranker):
    long_text = "planet " * (reranker.max_length + 10)
    texts = ["short", long_text]
    r = post(server, "/rerank", {"query": QUERY, "texts": texts, "truncate": False})
    assert r.status_code == 413
    assert "texts[1]" in r.json()["message"]
    long_query = "red " * reranker.query_max_length * 2
    r = post(server, "/rerank", {"query": long_query, "texts": ["a"], "truncate": False})
    assert r.status_code == 413 and r.json()["message"].startswith("query")
    ok = post(server, "/rerank", {"query": QUERY, "texts": ["short"], "truncate": False})
    assert ok.status_code == 200
    # by default (and with truncate: true) long texts are truncated and scored
    for extra in ({}, {"truncate": True}):
        got = post(server, "/rerank", {"query": QUERY, "texts": texts, **extra}).json()
        want = expected(reranker, texts)
        assert {x["index"]: pytest.approx(float(want[x["index"]]), abs=1e-5) for x in got} == {
            x["index"]: x["score"] for x in got
        }


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/rerank", {"query": QUERY}, 422, "documents: Field required"),
        ("/v2/rerank", {"documents": DOCS}, 422, "query: Field required"),
        ("/v2/rerank", {"query": 5, "documents": DOCS}, 422, "query: "),
        ("/v2/rerank", {"query": QUERY, "documents": ["a", 3]}, 422, "documents: item 1 "),
        ("/v2/rerank", {"query": QUERY, "documents": [{"txt": "a"}]}, 422, "item 0"),
        ("/v2/rerank", {"query": QUERY, "documents": "a"}, 422, "documents: must be a list"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "top_n: "),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": True}, 422, "top_n: "),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": -1},
            422,
            "max_tokens_per_doc: ",
        ),
        ("/rerank", {"query": QUERY, "texts": ["a", None]}, 422, "texts[1]: "),
        (
            "/rerank",
            {"query": QUERY, "texts": ["a"], "truncation_direction": "Up"},
            422,
            "truncation_direction",
        ),
        ("/v2/rerank", {"query": "", "documents": DOCS}, 400, "query must not be empty"),
        ("/v1/rerank", {"query": "  \n", "documents": DOCS}, 400, "query must not be empty"),
        ("/v2/rerank", {"query": QUERY, "documents": []}, 400, "documents must not be empty"),
        ("/rerank", {"query": QUERY, "texts": []}, 400, "texts must not be empty"),
        ("/rerank", {"query": "", "texts": ["a"]}, 400, "query must not be empty"),
        (
            "/v2/rerank",
            {"query": QUERY, "documents": ["d"] * (MAX_DOCS + 1)},
            413,
            f"documents has {MAX_DOCS + 1} items, more than this server's limit of {MAX_DOCS}",
        ),
        ("/rerank", {"query": QUERY, "texts": ["d"] * (MAX_DOCS + 1)}, 413, "texts has"),
    ],
)
def test_error_statuses_name_the_field(server, path, body, status, message):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    assert r.json()["detail"]


def test_invalid_json_is_422(server):
    r = httpx.post(
        server.url + "/v2/rerank", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["message"]


def test_oversized_body_is_413_with_and_without_content_length(server):
    body = ('{"query": "q", "documents": ["' + "x" * MAX_BODY + '"]}').encode()
    r = httpx.post(
        server.url + "/v2/rerank", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert f"limit of {MAX_BODY} bytes" in r.json()["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = httpx.post(
        server.url + "/v2/rerank", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert post(server, "/v2/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200


# ----------------------------------------------------------------------- other routes & probes
def test_health_ready_models_docs_and_page(server, reranker):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {
        "status": "ready",
        "model": served(reranker),
    }
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == served(reranker)
    assert httpx.get(server.url + "/docs").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/health", "/ready"} <= set(paths)
    page = httpx.get(server.url + "/")
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="rerank"' in page.text


def test_metrics(server, reranker):
    def scrape() -> str:
        r = httpx.get(server.url + "/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        return r.text

    before = scrape()
    assert post(server, "/v2/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
    assert post(server, "/v2/rerank", {"query": ""}).status_code == 422
    gc.collect()
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("crossrank_http_requests_total", route="/v2/rerank", status="200") == 1
    assert delta("crossrank_http_requests_total", route="/v2/rerank", status="422") == 1
    assert delta("crossrank_http_request_duration_seconds_count", route="/v2/rerank") == 2
    assert delta("crossrank_pairs_scored_total") == len(DOCS)
    assert delta("crossrank_batch_pairs_count") >= 1
    assert delta("crossrank_batch_pairs_sum") == len(DOCS)
    tokens = reranker.encode([QUERY] * len(DOCS), DOCS)
    assert delta("crossrank_batch_tokens_sum") >= tokens.total_tokens
    assert metric(after, "crossrank_queue_depth_pairs") == 0
    assert metric(after, "crossrank_http_requests_in_flight") >= 1  # the scrape itself
    assert metric(after, "crossrank_model_ready") == 1
    # the process's standard metrics too: full garbage collections, CPU time
    assert delta("python_gc_collections_total", generation="2") >= 1
    if os.path.exists("/proc/self/stat"):
        assert metric(after, "process_cpu_seconds_total") > 0
    httpx.get(server.url + "/no/such/route")
    assert metric(scrape(), "crossrank_http_requests_total", route="other", status="404") >= 1


# --------------------------------------------------------------------------------- cohere SDK
def _recording_client(paths: list[str]) -> httpx.Client:
    return httpx.Client(event_hooks={"request": [lambda req: paths.append(req.url.path)]})


def test_cohere_sdk_v2(server, reranker):
    paths: list[str] = []
    co = cohere.ClientV2(
        api_key="unused", base_url=server.url, httpx_client=_recording_client(paths)
    )
    res = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=4)
    assert paths == ["/v2/rerank"]
    want = expected(reranker)
    assert [r.index for r in res.results] == list(np.argsort(-want, kind="stable")[:4])
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(want[r.index]), abs=1e-5)


def test_cohere_sdk_v1(server, reranker):
    paths: list[str] = []
    co = cohere.Client(api_key="unused", base_url=server.url, httpx_client=_recording_client(paths))
    res = co.rerank(query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    assert paths == ["/v1/rerank"]
    want = expected(reranker)
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(want[r.index]), abs=1e-5)
        assert r.document.text == DOCS[r.index]


# --------------------------------------------------------------------------------------- auth
def test_auth_required_on_api_routes_only(auth_server, caplog):
    caplog.set_level(logging.DEBUG)
    url = auth_server.url
    body = {"query": QUERY, "documents": DOCS}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            r = httpx.post(url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert "API key" in r.json()["message"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    # an unauthenticated request is refused before its body is parsed
    assert httpx.post(url + "/v2/rerank", content=b"{nope").status_code == 401
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/v2/rerank", json=body, headers=good).status_code == 200
    assert (
        httpx.post(
            url + "/rerank",
            json={"query": QUERY, "texts": DOCS},
            headers={"authorization": f"bearer {KEY}"},
        ).status_code
        == 200
    )
    for open_path in ("/health", "/ready", "/metrics", "/", "/docs"):
        assert httpx.get(url + open_path).status_code == 200, open_path
    assert KEY not in caplog.text
    assert KEY not in repr(ServerSettings(api_key=KEY))


def test_cohere_sdk_with_api_key(auth_server):
    ok = cohere.ClientV2(api_key=KEY, base_url=auth_server.url)
    assert len(ok.rerank(model="m", query=QUERY, documents=DOCS).results) == len(DOCS)
    bad = cohere.ClientV2(api_key="wrong", base_url=auth_server.url)
    with pytest.raises(cohere.errors.UnauthorizedError):
        bad.rerank(model="m", query=QUERY, documents=DOCS)


# ---------------------------------------------------------------------------------- readiness
def test_ready_only_after_load_and_warmup(tiny_model_dir):
    release = threading.Event()
    built: list[Reranker] = []

    def factory() -> Reranker:
        assert release.wait(120)
        built.append(Reranker(str(tiny_model_dir), device="cpu"))
        return built[0]

    with BackgroundServer(create_app(factory)) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and "loading" in r.json()["message"]
        assert r.headers["retry-after"] == "1"
        r = post(srv, "/v2/rerank", {"query": QUERY, "documents": DOCS})
        assert r.status_code == 503 and "loading" in r.json()["message"]
        assert httpx.get(srv.url + "/v1/models").status_code == 503
        release.set()
        srv.wait_ready()
        assert post(srv, "/v2/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
    with pytest.raises(RuntimeError, match="shutdown"):  # the app built it, so it stopped it
        asyncio.run(built[0].ascore(QUERY, DOCS))


def test_failed_load_is_reported():
    errors: list[BaseException] = []

    def factory() -> Reranker:
        raise ModelLoadError("no such model: nowhere/nothing")

    with BackgroundServer(create_app(factory, on_load_error=errors.append)) as srv:
        wait_until(lambda: errors, what="the load error")
        assert isinstance(errors[0], ModelLoadError)
        r = httpx.get(srv.url + "/ready")  # needs no key: the reason (maybe a path) is left out
        assert r.status_code == 503 and "failed to load" in r.json()["message"]
        assert "nowhere" not in r.text
        r = post(srv, "/v2/rerank", {"query": QUERY, "documents": DOCS})
        assert r.status_code == 503
        assert "failed to load: no such model" in r.json()["message"]
        assert httpx.get(srv.url + "/health").status_code == 200


def test_on_ready_runs_after_warm_up_before_the_app_is_ready(tiny_model_dir):
    events: list[object] = []
    release = threading.Event()

    def factory() -> Reranker:
        reranker = Reranker(str(tiny_model_dir), device="cpu")
        warmup = reranker.warmup

        def warmup_then_note() -> None:
            warmup()
            events.append("warmed up")

        reranker.warmup = warmup_then_note  # type: ignore[method-assign]
        return reranker

    def on_ready() -> None:
        events.append(("on_ready", httpx.get(srv.url + "/ready").status_code))
        release.wait(30)

    with BackgroundServer(create_app(factory, on_ready=on_ready)) as srv:
        wait_until(lambda: len(events) == 2, what="on_ready")
        assert events == ["warmed up", ("on_ready", 503)]  # /ready still said "loading"
        release.set()
        srv.wait_ready()
        assert post(srv, "/v2/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
    assert len(events) == 2  # once


def test_the_command_line_server_freezes_its_heap_once_loaded():
    from crossrank.server.runner import freeze_heap

    class Cycle:  # garbage in a reference cycle: collected before the freeze, not frozen
        def __init__(self) -> None:
            self.me = self

    Cycle()
    kept = [object() for _ in range(10)]
    before = gc.get_freeze_count()
    try:
        freeze_heap()
        frozen = gc.get_freeze_count()
        assert frozen > before + len(kept)
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
        assert gc.isenabled()  # later objects are still collected
    finally:
        gc.unfreeze()


# ------------------------------------------------------------------ LlamaIndex TEI postprocessor
def test_llama_index_tei_postprocessor(auth_server, tiny_reranker):
    tei = pytest.importorskip("llama_index.postprocessor.tei_rerank")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]
    post = tei.TextEmbeddingInference(base_url=auth_server.url, top_n=3, auth_token=f"Bearer {KEY}")
    ranked = post.postprocess_nodes(nodes, QueryBundle(QUERY))
    want = tiny_reranker.score(QUERY, DOCS)
    best = np.argsort(-want, kind="stable")[:3]
    assert [n.node.get_content() for n in ranked] == [DOCS[i] for i in best]
    for node, i in zip(ranked, best, strict=True):
        assert node.score == pytest.approx(float(want[i]), abs=1e-5)
