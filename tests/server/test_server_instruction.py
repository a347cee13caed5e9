"""The ``instruction`` request field (a crossrank extension for decoder rerankers) on every
route that scores, on a real uvicorn server: Cohere/Jina ``/v1/rerank``, Infinity and TEI
``/rerank``, TEI ``/predict``. Scores equal the engine's per-call ``instruction=``; usage
counts the request's own prompts; an encoder model, an instruction that leaves no room and a
malformed one are 422s naming ``instruction``, never 5xx."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from crossrank import Reranker
from crossrank.server import create_app
from crossrank.server.app import _LeftCutter
from crossrank.server.runner import BackgroundServer
from crossrank.server.schemas import MAX_INSTRUCTION_CHARS
from tests.backends.llm_assets import OTHER_INSTRUCTION as OTHER
from tests.backends.llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES

pytestmark = pytest.mark.timeout(300)

QUERY = SAMPLE_QUERIES[0]


@pytest.fixture(scope="module")
def server(qwen3: Reranker):
    with BackgroundServer(create_app(qwen3)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def encoder_server(tiny_reranker: Reranker):
    with BackgroundServer(create_app(tiny_reranker)) as srv:
        srv.wait_ready()
        yield srv


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120)


def in_order(results: list[dict], key: str) -> list[float]:
    by_index = {r["index"]: r[key] for r in results}
    return [by_index[i] for i in range(len(by_index))]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_cohere_and_infinity_bodies(server, qwen3: Reranker, path: str):
    body = {"query": QUERY, "documents": SAMPLE_DOCUMENTS, "instruction": OTHER}
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS, instruction=OTHER)
    assert np.abs(expected - qwen3.score(QUERY, SAMPLE_DOCUMENTS)).max() > 1e-4
    np.testing.assert_allclose(
        in_order(r.json()["results"], "relevance_score"), expected, atol=1e-5
    )
    tokens = qwen3.encode([QUERY] * len(SAMPLE_DOCUMENTS), SAMPLE_DOCUMENTS, instruction=OTHER)
    assert r.json()["usage"]["total_tokens"] == tokens.total_tokens


def test_tei_rerank_and_predict(server, qwen3: Reranker):
    r = post(server, "/rerank", {"query": QUERY, "texts": SAMPLE_DOCUMENTS, "instruction": OTHER})
    assert r.status_code == 200, r.text
    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS, instruction=OTHER)
    np.testing.assert_allclose(in_order(r.json(), "score"), expected, atol=1e-5)
    pairs = [[QUERY, d] for d in SAMPLE_DOCUMENTS]
    r = post(server, "/predict", {"inputs": pairs, "instruction": OTHER, "raw_scores": True})
    assert r.status_code == 200, r.text
    raw = qwen3.score_pairs([tuple(p) for p in pairs], normalize=False, instruction=OTHER)
    np.testing.assert_allclose([p[0]["score"] for p in r.json()], raw, atol=1e-5)


def test_truncate_false_and_left_cut_count_the_instruction(server, qwen3: Reranker):
    tok = qwen3.tokenizer
    longer = tok.instruction + ", in the legal domain, citing the statute and the court"
    room = tok.max_length - tok.template_tokens() - int(tok.token_counts([QUERY])[0])
    fits = " ".join(["word"] * (room - 2))  # fits with the served instruction only
    body = {"query": QUERY, "texts": [fits], "truncate": False}
    assert post(server, "/rerank", body).status_code == 200
    refused = post(server, "/rerank", {**body, "instruction": longer})
    assert refused.status_code == 413 and "texts[0]" in refused.json()["error"]
    cutter, long_text = _LeftCutter(tok), fits + " tail" * 40
    cut = cutter.cut(QUERY, [long_text], longer)[0]
    assert long_text.endswith(cut)
    assert qwen3.first_overlong(QUERY, [cut], instruction=longer) is None
    served_cut = cutter.cut(QUERY, [long_text], None)[0]  # sized for the served instruction
    assert qwen3.first_overlong(QUERY, [served_cut], instruction=longer) == 0


def test_an_instruction_that_leaves_no_room_is_a_422(server, qwen3: Reranker):
    too_long = "word " * (qwen3.max_length - qwen3.query_max_length)
    assert len(too_long) <= MAX_INSTRUCTION_CHARS
    for path, body in [
        ("/v1/rerank", {"query": QUERY, "documents": ["x"]}),
        ("/rerank", {"query": QUERY, "texts": ["x"]}),
        ("/predict", {"inputs": [QUERY, "x"]}),
    ]:
        r = post(server, path, {**body, "instruction": too_long})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["message"].startswith("instruction makes the qwen3-reranker prompt")


@pytest.mark.parametrize("bad", [5, ["a"], "x" * (MAX_INSTRUCTION_CHARS + 1)])
def test_a_malformed_instruction_is_a_422_naming_it(server, bad):
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": ["x"], "instruction": bad})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "instruction"


def test_an_encoder_model_refuses_an_instruction(encoder_server):
    for path, body in [
        ("/v1/rerank", {"query": QUERY, "documents": ["x"]}),
        ("/rerank", {"query": QUERY, "documents": ["x"]}),
        ("/rerank", {"query": QUERY, "texts": ["x"]}),
        ("/predict", {"inputs": [QUERY, "x"]}),
    ]:
        assert post(encoder_server, path, body).status_code == 200
        r = post(encoder_server, path, {**body, "instruction": "task"})
        assert r.status_code == 422, (path, r.text)
        assert "instruction applies to decoder (LLM) rerankers only" in r.json()["message"]


def test_the_field_is_documented_as_an_extension(server):
    schemas = httpx.get(server.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    for name in ("RerankRequest", "TEIRerankRequest", "TEIPredictRequest"):
        field = schemas[name]["properties"]["instruction"]
        assert field["description"].startswith("crossrank extension")
        assert {"maxLength": MAX_INSTRUCTION_CHARS, "type": "string"} in field["anyOf"]
