"""Regression tests for the server faults of issue 13: a lone surrogate echoed (2), a
chunk-mode request that can never fit the queue (3), an empty API key (4), slow clients
(5), invisible-only queries (14), non-finite scores (15) and credentials in the access log
(16). Each failed before its fix."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import httpx
import numpy as np
import pytest

from crossrank import Reranker
from crossrank.server import ServerSettings, create_app
from crossrank.server.connections import redact_query
from crossrank.server.runner import BackgroundServer
from crossrank.server.settings import api_key_from_env
from crossrank.validation import check_query
from tests.server.helpers import metric

pytestmark = pytest.mark.timeout(300)

KEY = "sk-hard-" + uuid.uuid4().hex
QUERY = "Which planet is known as the red planet?"


@pytest.fixture(scope="module")
def server(tiny_reranker):
    with BackgroundServer(create_app(tiny_reranker)) as srv:
        srv.wait_ready()
        yield srv


def post_raw(srv, path: str, body: str, **kw) -> httpx.Response:
    """POST a JSON text as is (``json.dumps`` cannot make a lone surrogate escape wrong)."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(srv.url + path, content=body.encode(), headers=headers, timeout=60, **kw)


# -------------------------------------------------------------------------- fault 2: surrogate
@pytest.mark.parametrize(
    ("path", "body", "echoed"),
    [
        ("/v1/rerank", '{"query":"q","documents":["a\\ud800"],"return_documents":true}', "doc"),
        (
            "/v2/rerank",
            '{"query":"q","documents":[{"text":"a\\ud800"}],"return_documents":true}',
            "doc",
        ),
        ("/rerank", '{"query":"q","documents":["a\\ud800"],"return_documents":true}', "infinity"),
        ("/rerank", '{"query":"q","texts":["a\\ud800"],"return_text":true}', "tei"),
        (
            "/v1/rerank",
            '{"query":"q","documents":[{"t\\udc00":"a\\ud800"}],"rank_fields":["t\\udc00"],'
            '"return_documents":true}',
            "object",
        ),
    ],
)
def test_lone_surrogate_is_echoed_scrubbed(server, path, body, echoed):
    r = post_raw(server, path, body)
    assert r.status_code == 200, r.text
    got = r.json()
    if echoed == "doc":
        assert got["results"][0]["document"] == {"text": "a\ufffd"}
    elif echoed == "infinity":
        assert got["results"][0]["document"] == "a\ufffd"
    elif echoed == "tei":
        assert got[0]["text"] == "a\ufffd"
    else:
        assert got["results"][0]["document"] == {"t\ufffd": "a\ufffd"}


def test_lone_surrogate_in_predict_and_errors(server):
    assert post_raw(server, "/predict", '{"inputs":["q","a\\ud800"]}').status_code == 200
    r = post_raw(server, "/v2/rerank", '{"query":"q","documents":[{"\\ud800":1}]}')
    assert r.status_code == 422 and "item 0" in r.json()["message"]


# -------------------------------------------------------------------- fault 3: never fits (413)
def test_chunk_request_that_can_never_fit_the_queue_is_413(tiny_model_dir):
    reranker = Reranker(str(tiny_model_dir), device="cpu", long_docs="chunk", chunk_tokens=32)
    settings = ServerSettings(max_docs=5, max_queue=40)
    long_doc = " ".join(f"word{i}" for i in range(1500))
    try:
        with BackgroundServer(create_app(reranker, settings)) as srv:
            srv.wait_ready()
            body = {"query": QUERY, "documents": [long_doc] * 5}
            r = httpx.post(srv.url + "/v2/rerank", json=body, timeout=60)
            assert r.status_code == 413, r.text
            assert "--max-queue" in r.json()["message"] and "40" in r.json()["message"]
            assert "retry-after" not in r.headers
            ok = httpx.post(srv.url + "/v2/rerank", json={"query": QUERY, "documents": ["a"]})
            assert ok.status_code == 200
    finally:
        reranker.close()


# ------------------------------------------------------------------------ fault 4: empty key
@pytest.mark.parametrize("value", ["", " ", "\t\n"])
def test_empty_api_key_from_any_source_is_refused(value):
    with pytest.raises(ValueError, match="CROSSRANK_API_KEY is set but empty"):
        api_key_from_env(None, {"CROSSRANK_API_KEY": value})
    with pytest.raises(ValueError, match="--api-key is set but empty"):
        api_key_from_env(value, {})
    with pytest.raises(ValueError, match="api_key must not be empty"):
        ServerSettings(api_key=value)
    assert api_key_from_env(None, {}) is None
    assert api_key_from_env(None, {"CROSSRANK_API_KEY": "k"}) == "k"


# ----------------------------------------------------------------------- fault 5: slow clients
@pytest.fixture(scope="module")
def strict_server(tiny_reranker):
    settings = ServerSettings(timeout_header=0.5, timeout_body=0.5, max_header_bytes=2048)
    with BackgroundServer(create_app(tiny_reranker, settings), settings=settings) as srv:
        srv.wait_ready()
        yield srv


def _connect(srv) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s at most)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"", b""),  # connected, silent: just closed
        (b"POST /v2/rerank HTTP/1.1\r\nhost: x\r\n", b"408"),  # partial headers
        (
            b"POST /v2/rerank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"query"',
            b"408",
        ),  # partial body
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 4096, b"431"),  # huge headers
    ],
)
def test_slow_or_oversized_clients_are_disconnected(strict_server, sent, status):
    with _connect(strict_server) as sock:
        sock.sendall(sent)
        reply = _read_all(sock)  # returns only because the server closed the connection
    assert reply.split(b" ")[1:2] == ([status] if status else [])


def test_keep_alive_then_partial_request_is_closed(strict_server):
    with _connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request stalls
        assert b"408" in _read_all(sock)
    assert httpx.get(strict_server.url + "/health").status_code == 200


# ---------------------------------------------------------------- fault 14: invisible queries
@pytest.mark.parametrize("query", ["\u200b", "\u200b\u200c\u2060", "\x00\x01", "\ufeff \u00a0\t"])
def test_invisible_query_is_refused_like_an_empty_one(server, tiny_reranker, query):
    with pytest.raises(ValueError, match="query must not be empty"):
        check_query(query)
    with pytest.raises(ValueError, match="query must not be empty"):
        tiny_reranker.score(query, ["a"])
    for path, body in (("/v2/rerank", {"documents": ["a"]}), ("/rerank", {"texts": ["a"]})):
        r = httpx.post(server.url + path, json={"query": query, **body}, timeout=60)
        assert r.status_code == 400 and "query must not be empty" in r.json()["message"]
    assert check_query("\u200bMars") == "\u200bMars"


# --------------------------------------------------------------------- fault 15: NaN scores
def nan_reranker(model_dir) -> Reranker:
    """A real reranker whose forward passes yield NaN for pairs of documents saying 'nan'
    (injected where every path's passes go: the device worker's ``submit``)."""
    reranker = Reranker(str(model_dir), device="cpu")
    worker = reranker._devices.workers[0]
    submit = worker.submit
    nan_id = reranker.tokenizer.tokenizer("nan", add_special_tokens=False)["input_ids"][0]

    def submit_with_nan(encoded):
        pending = submit(encoded)
        bad = np.asarray(
            [
                nan_id in encoded.ids[start : start + n]
                for start, n in zip(encoded.offsets, encoded.lengths, strict=True)
            ],
            dtype=bool,
        )

        def result():
            scores = np.array(pending(), dtype=np.float32)
            scores[bad] = np.nan
            return scores

        return result

    worker.submit = submit_with_nan
    return reranker


def test_non_finite_score_is_424_and_counted(tiny_model_dir):
    reranker = nan_reranker(tiny_model_dir)
    try:
        with BackgroundServer(create_app(reranker)) as srv:
            srv.wait_ready()
            for path, body in (
                ("/v2/rerank", {"query": QUERY, "documents": ["fine", "nan"]}),
                ("/rerank", {"query": QUERY, "documents": ["nan"]}),
            ):
                r = httpx.post(srv.url + path, json=body, timeout=60)
                assert r.status_code == 424, r.text
                assert "non-finite score for documents[" in r.json()["message"]
            tei = httpx.post(srv.url + "/rerank", json={"query": QUERY, "texts": ["nan"]})
            assert tei.status_code == 424 and tei.json()["error_type"] == "backend"
            pred = httpx.post(srv.url + "/predict", json={"inputs": [[QUERY, "nan"]]})
            assert pred.status_code == 424
            ok = httpx.post(srv.url + "/v2/rerank", json={"query": QUERY, "documents": ["ok"]})
            assert ok.status_code == 200
            text = httpx.get(srv.url + "/metrics").text
            assert metric(text, "crossrank_nonfinite_scores_total") == 4
    finally:
        reranker.close()


# ---------------------------------------------------------- fault 16: credentials in the logs
def test_redact_query():
    assert redact_query("/v1/models?api_key=s3cret&x=1") == "/v1/models?api_key=[REDACTED]&x=1"
    assert redact_query("/a?token=t;key=k&Authorization=b") == (
        "/a?token=[REDACTED];key=[REDACTED]&Authorization=[REDACTED]"
    )
    assert redact_query("/a?api%5Fkey=s") == "/a?api%5Fkey=[REDACTED]"
    assert redact_query("/a?q=1") == "/a?q=1" and redact_query("/a") == "/a"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_access_log_never_shows_a_key_and_ready_shows_the_served_name(tiny_reranker):
    app = create_app(tiny_reranker, ServerSettings(api_key=KEY))
    records = _Records()
    with BackgroundServer(app, log_level="info") as srv:
        access = logging.getLogger("uvicorn.access")  # uvicorn's own, not propagated
        access.addHandler(records)
        try:
            srv.wait_ready()
            r = httpx.get(srv.url + f"/v1/models?api_key={KEY}&page=2")
            assert r.status_code == 401
            ready = httpx.get(srv.url + "/ready").json()
        finally:
            access.removeHandler(records)
    # one line per response, in uvicorn's format (written by crossrank once the response is
    # sent; uvicorn's own is off)
    models = [x for x in records.lines if "/v1/models" in x]
    assert (
        len(models) == 1 and '"GET /v1/models?api_key=[REDACTED]&page=2 HTTP/1.1" 401' in models[0]
    )
    assert records.lines[-1].endswith('"GET /ready HTTP/1.1" 200'), records.lines
    assert not any(KEY in line for line in records.lines)
    assert ready == {"status": "ready", "model": os.path.basename(tiny_reranker.model_name)}
