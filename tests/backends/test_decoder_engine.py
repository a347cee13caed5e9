"""The engine and every front door on decoder (LLM) rerankers: ``Reranker(path)`` on a tiny
random Qwen3-Reranker / bge-reranker-v2-gemma against independent implementations of the
model cards' recipes (``test_decoder.py``), fp32 CPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from crossrank import Reranker
from crossrank.backends.decoder import PromptTokenizer
from crossrank.backends.setup import score_fingerprint
from crossrank.errors import OptionError

from .llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES
from .test_decoder import CARD_SUFFIX, card_scores, flag_llm_scores, sigmoid

QUERY = SAMPLE_QUERIES[0]
LONG_DOC = "Beijing is the capital of China and has a long history. " * 60


def test_engine_matches_the_model_card(qwen3: Reranker, tiny_qwen3_dir: Path):
    assert isinstance(qwen3.tokenizer, PromptTokenizer)
    assert qwen3.tokenizer.family.name == "qwen3-reranker"
    prob, raw = card_scores(tiny_qwen3_dir, [(QUERY, d) for d in SAMPLE_DOCUMENTS])
    np.testing.assert_allclose(qwen3.score(QUERY, SAMPLE_DOCUMENTS), prob, atol=1e-4)
    got = qwen3.score(QUERY, SAMPLE_DOCUMENTS, normalize=False)
    np.testing.assert_allclose(got, raw, atol=1e-4)


def test_custom_instruction_changes_the_prompt(tiny_qwen3_dir: Path):
    instruction = "Given a question, retrieve passages written in Chinese"
    engine = Reranker(str(tiny_qwen3_dir), device="cpu", max_length=256, instruction=instruction)
    _, raw = card_scores(tiny_qwen3_dir, [(QUERY, d) for d in SAMPLE_DOCUMENTS], instruction)
    got = engine.score(QUERY, SAMPLE_DOCUMENTS, normalize=False)
    np.testing.assert_allclose(got, raw, atol=1e-4)


def test_long_document_is_cut_not_the_template(qwen3: Reranker, tiny_qwen3_dir: Path):
    encoded = qwen3.encode([QUERY], [LONG_DOC])
    assert encoded.total_tokens == 256
    suffix = qwen3.tokenizer.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    assert encoded.ids[-len(suffix) :].tolist() == suffix
    _, raw = card_scores(tiny_qwen3_dir, [(QUERY, LONG_DOC)], max_length=256)
    np.testing.assert_allclose(qwen3.score(QUERY, [LONG_DOC], normalize=False), raw, atol=1e-4)


def test_chunk_mode_and_cache(tiny_qwen3_dir: Path, qwen3: Reranker):
    engine = Reranker(
        str(tiny_qwen3_dir), device="cpu", max_length=256, long_docs="chunk", cache="memory"
    )
    docs = [SAMPLE_DOCUMENTS[0], LONG_DOC]
    first = engine.rerank(QUERY, docs)
    assert engine.encode([QUERY], [LONG_DOC]).pair_index.tolist().count(0) > 1
    again = engine.rerank(QUERY, docs)
    assert [(r.index, r.score) for r in again] == [(r.index, r.score) for r in first]
    assert engine.cache_stats is not None and engine.cache_stats.hits == 2
    # a document that fits in one window scores as in truncate mode
    short = next(r for r in first if r.index == 0)
    assert short.score == pytest.approx(float(qwen3.score(QUERY, docs[:1])[0]), abs=1e-5)


def test_instruction_is_in_the_cache_fingerprint(tiny_qwen3_dir: Path, qwen3: Reranker):
    other = Reranker(str(tiny_qwen3_dir), device="cpu", max_length=256, instruction="Other")
    fingerprints = [
        score_fingerprint({}, engine.options, engine.dtype, engine.tokenizer)
        for engine in (other, qwen3)
    ]
    assert fingerprints[0] != fingerprints[1]


def test_instruction_is_refused_for_encoders(tiny_model_dir: Path):
    with pytest.raises(OptionError) as err:
        Reranker(str(tiny_model_dir), device="cpu", instruction="anything")
    assert err.value.param == "instruction"


def test_gemma_engine_matches_flag_llm_reranker(tiny_gemma_dir: Path):
    engine = Reranker(str(tiny_gemma_dir), device="cpu", max_length=512)
    pairs = [(QUERY, d) for d in SAMPLE_DOCUMENTS]
    expected = flag_llm_scores(tiny_gemma_dir, pairs, max_length=512)
    got = engine.score(QUERY, SAMPLE_DOCUMENTS)
    np.testing.assert_allclose(got, sigmoid(expected), atol=1e-4)


# ---- front doors
def test_langchain_compressor(qwen3: Reranker):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from crossrank.langchain import CrossRankCompressor

    docs = [Document(page_content=d) for d in SAMPLE_DOCUMENTS]
    out = CrossRankCompressor(model=qwen3, top_n=3).compress_documents(docs, QUERY)
    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS)
    assert [d.page_content for d in out] == [SAMPLE_DOCUMENTS[i] for i in np.argsort(-expected)[:3]]


def test_llama_index_postprocessor(qwen3: Reranker):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from crossrank.llama_index import CrossRankRerank

    nodes = [NodeWithScore(node=TextNode(text=d)) for d in SAMPLE_DOCUMENTS]
    out = CrossRankRerank(model=qwen3, top_n=2).postprocess_nodes(
        nodes, query_bundle=QueryBundle(QUERY)
    )
    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS)
    order = np.argsort(-expected)[:2]
    assert [n.node.get_content() for n in out] == [SAMPLE_DOCUMENTS[i] for i in order]
    np.testing.assert_allclose([n.score for n in out], expected[order], atol=1e-6)


def test_server_cohere_and_tei_routes(qwen3: Reranker):
    from crossrank.server import create_app
    from crossrank.server.runner import BackgroundServer

    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS)
    with BackgroundServer(create_app(qwen3)) as srv:
        srv.wait_ready()
        body = {"query": QUERY, "documents": SAMPLE_DOCUMENTS}
        cohere = httpx.post(srv.url + "/v1/rerank", json=body, timeout=120)
        tei = httpx.post(
            srv.url + "/rerank", json={"query": QUERY, "texts": SAMPLE_DOCUMENTS}, timeout=120
        )
    assert cohere.status_code == 200, cohere.text
    by_index = {r["index"]: r["relevance_score"] for r in cohere.json()["results"]}
    np.testing.assert_allclose([by_index[i] for i in range(len(expected))], expected, atol=1e-5)
    assert tei.status_code == 200, tei.text
    tei_scores = {r["index"]: r["score"] for r in tei.json()}
    np.testing.assert_allclose([tei_scores[i] for i in range(len(expected))], expected, atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_score_dataset(tiny_qwen3_dir: Path, qwen3: Reranker):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from crossrank.ray import score_dataset

    rows = [{"q": QUERY, "d": d, "id": i} for i, d in enumerate(SAMPLE_DOCUMENTS)]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        scored = score_dataset(
            ray.data.from_items(rows),
            query_col="q",
            doc_col="d",
            out_col="s",
            model=str(tiny_qwen3_dir),
            concurrency=1,
            batch_size=8,
            device="cpu",
            max_length=256,
        ).take_all()
    finally:
        ray.shutdown()
    got = {r["id"]: r["s"] for r in scored}
    expected = qwen3.score(QUERY, SAMPLE_DOCUMENTS)
    np.testing.assert_allclose([got[i] for i in range(len(rows))], expected, atol=1e-5)
