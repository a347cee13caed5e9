"""The adapters' ``instruction`` field on a decoder (LLM) reranker, with the real LangChain and
LlamaIndex classes: each call is scored with it (as ``Reranker(..., instruction=)`` scores it
per call), the shared engine is never changed, adapters with different instructions share one
engine, and an encoder model refuses it naming ``instruction``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from crossrank import Reranker
from crossrank.errors import OptionError
from crossrank.langchain import CrossRankCompressor, CrossRankCrossEncoder
from crossrank.llama_index import CrossRankRerank
from crossrank.registry import get_reranker
from tests.backends.llm_assets import OTHER_INSTRUCTION as OTHER
from tests.backends.llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES

QUERY = SAMPLE_QUERIES[0]


@pytest.fixture(scope="module")
def expected(qwen3: Reranker) -> np.ndarray:
    """Per-call scores with ``OTHER``, which differ from the engine's own."""
    scores = qwen3.score(QUERY, SAMPLE_DOCUMENTS, instruction=OTHER)
    assert np.abs(scores - qwen3.score(QUERY, SAMPLE_DOCUMENTS)).max() > 1e-4
    return scores


def by_text(texts: list[str], scores: list[float]) -> list[float]:
    """Scores in ``SAMPLE_DOCUMENTS`` order (every document is a distinct text)."""
    found = dict(zip(texts, scores, strict=True))
    return [found[d] for d in SAMPLE_DOCUMENTS]


def test_langchain_compressor_and_cross_encoder(qwen3: Reranker, expected: np.ndarray):
    compressor = CrossRankCompressor(model=qwen3, top_n=None, instruction=OTHER)
    docs = [Document(page_content=d) for d in SAMPLE_DOCUMENTS]
    for out in (
        compressor.compress_documents(docs, QUERY),
        asyncio.run(compressor.acompress_documents(docs, QUERY)),
    ):
        scores = by_text(
            [d.page_content for d in out], [d.metadata["relevance_score"] for d in out]
        )
        np.testing.assert_allclose(scores, expected, atol=1e-6)
    cross = CrossRankCrossEncoder(model=qwen3, instruction=OTHER)
    pairs = [(QUERY, d) for d in SAMPLE_DOCUMENTS]
    np.testing.assert_allclose(cross.score(pairs), expected, atol=1e-6)
    assert qwen3.tokenizer.instruction != OTHER  # the engine is left as it was


def test_llama_index_postprocessor(qwen3: Reranker, expected: np.ndarray):
    rerank = CrossRankRerank(model=qwen3, top_n=None, instruction=OTHER)
    nodes = [NodeWithScore(node=TextNode(text=d)) for d in SAMPLE_DOCUMENTS]
    bundle = QueryBundle(QUERY)
    for out in (
        rerank.postprocess_nodes(nodes, query_bundle=bundle),
        asyncio.run(rerank.apostprocess_nodes(nodes, query_bundle=bundle)),
    ):
        scores = by_text([n.node.get_content() for n in out], [n.score for n in out])
        np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_adapters_with_different_instructions_share_one_engine(tiny_qwen3_dir: Path):
    options = {"model": str(tiny_qwen3_dir), "device": "cpu", "max_length": 256}
    one = CrossRankRerank(**options, instruction=OTHER)
    other = CrossRankCompressor(**options)
    assert one.engine is other.engine is get_reranker(**options)
    assert CrossRankRerank.from_dict(one.to_dict()).instruction == OTHER


def test_an_encoder_model_refuses_the_instruction(tiny_reranker: Reranker):
    docs = [Document(page_content="Mars is red.")]
    with pytest.raises(OptionError, match="decoder") as err:
        CrossRankCompressor(model=tiny_reranker, instruction="task").compress_documents(docs, "q")
    assert err.value.param == "instruction"
    nodes = [NodeWithScore(node=TextNode(text="Mars is red."))]
    with pytest.raises(OptionError, match="decoder"):
        CrossRankRerank(model=tiny_reranker, instruction="task").postprocess_nodes(
            nodes, query_str="q"
        )
