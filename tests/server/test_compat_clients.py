"""Compatibility with the clients users already run (issue 15): each test drives the server
with the real, unmodified client package, changing only its base URL and key. Expected
scores come from the engine's own ``Reranker.score`` on the same texts."""

from __future__ import annotations

import asyncio
import functools
import os
import uuid

import httpx
import numpy as np
import pytest

from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer

pytestmark = pytest.mark.timeout(300)

KEY = "sk-compat-" + uuid.uuid4().hex
QUERY = "Which planet is known as the red planet?"
DOCS = [
    "Mars is known as the Red Planet because of iron oxide on its surface.",
    "Jupiter is the largest planet in the solar system.",
    "火星因表面的氧化铁而被称为红色星球。",
    "La tour Eiffel se trouve à Paris.",
    "Venus is the hottest planet even though Mercury is closer to the Sun.",
]
ALIASES = ("tiny-reranker", "rerank-alias")


@pytest.fixture(scope="module")
def server(tiny_reranker):
    settings = ServerSettings(api_key=KEY)
    with BackgroundServer(create_app(tiny_reranker, settings)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def want(tiny_reranker) -> np.ndarray:
    return tiny_reranker.score(QUERY, DOCS)


def best(scores: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]


def assert_ranked(indices: list[int], scores: list[float], want: np.ndarray) -> None:
    assert indices == best(want, len(indices))
    assert scores == pytest.approx([float(want[i]) for i in indices], abs=1e-5)


# ----------------------------------------------------------------------------------- Infinity
def test_infinity_client_rerank_raw_scores_documents_and_models(server, tiny_reranker, want):
    from infinity_client import AuthenticatedClient
    from infinity_client.api.default import models, rerank
    from infinity_client.models import RerankInput

    client = AuthenticatedClient(base_url=server.url, token=KEY)
    body = RerankInput(query=QUERY, documents=DOCS, return_documents=True)
    result = rerank.sync(client=client, body=body)
    assert result.model == os.path.basename(tiny_reranker.model_name)
    tokens = tiny_reranker.encode([QUERY] * len(DOCS), DOCS).total_tokens
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (tokens, tokens)
    assert_ranked(
        [r.index for r in result.results], [r.relevance_score for r in result.results], want
    )
    assert [r.document for r in result.results] == [DOCS[r.index] for r in result.results]

    raw = rerank.sync(client=client, body=RerankInput(query=QUERY, documents=DOCS, raw_scores=True))
    logits = tiny_reranker.score(QUERY, DOCS, normalize=False)
    assert_ranked([r.index for r in raw.results], [r.relevance_score for r in raw.results], logits)
    assert all(r.to_dict().get("document") is None for r in raw.results)

    listed = models.sync(client=client)
    assert [m.id for m in listed.data] == [os.path.basename(tiny_reranker.model_name)]


def test_langchain_infinity_rerank(server, want):
    from infinity_client import Client
    from langchain_community.document_compressors.infinity_rerank import InfinityRerank
    from langchain_core.documents import Document

    client = Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    rerank = InfinityRerank(client=client, top_n=3)
    out = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    indices = [DOCS.index(d.page_content) for d in out]
    assert_ranked(indices, [d.metadata["relevance_score"] for d in out], want)


# ------------------------------------------------------------------------------------- Cohere
def test_cohere_v1_rank_fields_and_meta(server, tiny_reranker):
    import cohere

    docs = [
        {"title": "Mars", "body": DOCS[0], "id": 7},
        {"title": "Jupiter", "body": DOCS[1]},
        {"body": DOCS[4]},  # a missing field is skipped
    ]
    co = cohere.Client(api_key=KEY, base_url=server.url)
    res = co.rerank(
        model="rerank-v3.5",
        query=QUERY,
        documents=docs,
        rank_fields=["title", "body"],
        return_documents=True,
    )
    # Cohere's recommended form for structured data: one "field: value" line per field
    texts = [f"title: Mars\nbody: {DOCS[0]}", f"title: Jupiter\nbody: {DOCS[1]}", DOCS[4]]
    want = tiny_reranker.score(QUERY, texts)
    assert_ranked([r.index for r in res.results], [r.relevance_score for r in res.results], want)
    raw = co.rerank(model="m", query=QUERY, documents=docs, rank_fields=["title", "body"])
    assert raw.meta.api_version.version == "1" and raw.meta.billed_units.search_units == 1
    body = httpx.post(
        server.url + "/v1/rerank",
        json={
            "query": QUERY,
            "documents": docs,
            "rank_fields": ["title", "body"],
            "return_documents": True,
        },
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert [r["document"] for r in body["results"]] == [docs[r["index"]] for r in body["results"]]


def test_cohere_v2_sync_and_async(server, want):
    import cohere

    res = cohere.ClientV2(api_key=KEY, base_url=server.url).rerank(
        model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3
    )
    assert_ranked([r.index for r in res.results], [r.relevance_score for r in res.results], want)
    assert res.meta.api_version.version == "2"

    async def arerank():
        client = cohere.AsyncClientV2(api_key=KEY, base_url=server.url)
        return await client.rerank(model="m", query=QUERY, documents=DOCS, top_n=2)

    ares = asyncio.run(arerank())
    assert_ranked([r.index for r in ares.results], [r.relevance_score for r in ares.results], want)


def test_langchain_cohere_rerank(server, want):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    rerank = CohereRerank(cohere_api_key=KEY, base_url=server.url, model="rerank-v3.5", top_n=3)
    out = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    indices = [DOCS.index(d.page_content) for d in out]
    assert_ranked(indices, [d.metadata["relevance_score"] for d in out], want)


def _nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]


def test_llama_index_cohere_rerank(server, want):
    from llama_index.core.schema import QueryBundle
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    rerank = CohereRerank(api_key=KEY, base_url=server.url, model="rerank-v3.5", top_n=3)
    out = rerank.postprocess_nodes(_nodes(), QueryBundle(QUERY))
    assert_ranked([DOCS.index(n.node.get_content()) for n in out], [n.score for n in out], want)


# --------------------------------------------------------------------------------------- Jina
def test_llama_index_jina_rerank(server, want):
    from llama_index.core.schema import QueryBundle
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    rerank = JinaRerank(api_key=KEY, base_url=server.url + "/v1", top_n=3)
    out = rerank.postprocess_nodes(_nodes(), QueryBundle(QUERY))
    assert_ranked([DOCS.index(n.node.get_content()) for n in out], [n.score for n in out], want)


def test_langchain_community_jina_rerank(server, want, monkeypatch):
    from langchain_community.document_compressors import jina_rerank
    from langchain_core.documents import Document

    # the package has no URL option: patching its constant is its only way to a self-host
    monkeypatch.setattr(jina_rerank, "JINA_API_URL", server.url + "/v1/rerank")
    rerank = jina_rerank.JinaRerank(jina_api_key=KEY, top_n=3)
    out = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    indices = [DOCS.index(d.page_content) for d in out]
    assert_ranked(indices, [d.metadata["relevance_score"] for d in out], want)


# ----------------------------------------------------------------------- rerankers API rankers
@pytest.mark.parametrize(
    ("provider", "path"),
    [("cohere", "/v1/rerank"), ("jina", "/v1/rerank"), ("text-embeddings-inference", "/rerank")],
)
def test_rerankers_api_rankers(server, want, provider, path):
    from rerankers.models.api_rankers import APIRanker

    ranker = APIRanker(model="m", api_key=KEY, api_provider=provider, url=server.url + path)
    ranked = ranker.rank(QUERY, DOCS).results
    assert_ranked([r.document.doc_id for r in ranked], [r.score for r in ranked], want)


# ---------------------------------------------------------------------------------------- TEI
def test_tei_info_with_huggingface_hub(server, tiny_reranker):
    from huggingface_hub import InferenceClient

    info = InferenceClient(model=server.url, token=KEY, provider="hf-inference")
    info = info.get_endpoint_info()
    assert info["model_id"] == os.path.basename(tiny_reranker.model_name)
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
    assert info["max_input_length"] == tiny_reranker.max_length
    assert info["max_client_batch_size"] == ServerSettings().max_docs


def test_tei_predict_pairs_and_errors(server, tiny_reranker):
    # no released TEI client sends pairs to /predict (huggingface_hub sends single texts)
    auth = {"Authorization": f"Bearer {KEY}"}
    pairs = [[QUERY, DOCS[0]], ["what is tall?", DOCS[1]]]
    got = httpx.post(server.url + "/predict", json={"inputs": pairs}, headers=auth).json()
    want = tiny_reranker.score_pairs([tuple(p) for p in pairs])
    assert [[p["label"] for p in preds] for preds in got] == [["LABEL_0"], ["LABEL_0"]]
    assert [preds[0]["score"] for preds in got] == pytest.approx(want.tolist(), abs=1e-5)
    one = httpx.post(
        server.url + "/predict", json={"inputs": pairs[0], "raw_scores": True}, headers=auth
    ).json()
    logit = tiny_reranker.score_pairs([tuple(pairs[0])], normalize=False)[0]
    assert one == [{"score": pytest.approx(float(logit), abs=1e-4), "label": "LABEL_0"}]
    single = httpx.post(server.url + "/predict", json={"inputs": "hi"}, headers=auth)
    assert single.status_code == 422
    assert single.json()["error_type"] == "validation" and "pair" in single.json()["error"]


def test_tei_error_body_and_left_truncation(server, tiny_reranker):
    auth = {"Authorization": f"Bearer {KEY}"}
    post = functools.partial(httpx.post, headers=auth, timeout=60)
    bad = post(server.url + "/rerank", json={"query": "", "texts": ["a"]})
    assert bad.status_code == 400
    assert bad.json()["error_type"] == "validation" and "query" in bad.json()["error"]
    schema = post(server.url + "/rerank", json={"query": "q", "texts": [1]})
    assert schema.status_code == 422 and "texts[0]" in schema.json()["error"]

    long_text = " ".join(f"w{i}" for i in range(2000)) + " Mars is the red planet."
    body = {"query": QUERY, "texts": [long_text]}
    left = post(server.url + "/rerank", json={**body, "truncation_direction": "Left"}).json()
    right = post(server.url + "/rerank", json=body).json()
    # the pair keeps the text's last tokens: the same score as scoring its tail
    tok = tiny_reranker.tokenizer
    room = tok.max_length - tok.special_tokens_in_pair - len(tok.tokenizer.tokenize(QUERY))
    ids = tok.tokenizer(long_text, add_special_tokens=False, return_offsets_mapping=True)
    tail = long_text[ids["offset_mapping"][-room][0] :]
    assert left[0]["score"] == pytest.approx(float(tiny_reranker.score(QUERY, [tail])[0]), abs=1e-5)
    assert right[0]["score"] == pytest.approx(
        float(tiny_reranker.score(QUERY, [long_text])[0]), abs=1e-5
    )
    assert left[0]["score"] != pytest.approx(right[0]["score"], abs=1e-6)


def test_llama_index_tei_rerank(server, want):
    from llama_index.core.schema import QueryBundle
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    rerank = TextEmbeddingInference(base_url=server.url, top_n=3, auth_token=f"Bearer {KEY}")
    out = rerank.postprocess_nodes(_nodes(), QueryBundle(QUERY))
    assert_ranked([DOCS.index(n.node.get_content()) for n in out], [n.score for n in out], want)


# ------------------------------------------------------------------------------- served names
def test_served_model_name_and_aliases(tiny_reranker):
    settings = ServerSettings(served_model_name=ALIASES)
    with BackgroundServer(create_app(tiny_reranker, settings)) as srv:
        srv.wait_ready()
        assert httpx.get(srv.url + "/ready").json()["model"] == ALIASES[0]
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == list(ALIASES)
        assert [m["id"] for m in httpx.get(srv.url + "/models").json()["data"]] == list(ALIASES)
        body = {"query": QUERY, "documents": DOCS}
        for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            assert httpx.post(srv.url + path, json=body).json()["model"] == ALIASES[0]
        assert httpx.get(srv.url + "/info").json()["model_id"] == ALIASES[0]


def test_default_served_name_is_never_a_path():
    from crossrank.server.settings import default_served_name

    assert default_served_name("BAAI/bge-reranker-v2-m3") == "BAAI/bge-reranker-v2-m3"
    assert default_served_name("/models/bge-reranker-v2-m3/") == "bge-reranker-v2-m3"
    assert default_served_name("~/models/x") == "x"
    assert default_served_name("./local") == "local"
