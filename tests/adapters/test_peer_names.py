"""The adapters under the peers' names and parameters, threshold checks, and outputs that
share nothing with their inputs (issue 15 one-line swaps; issue 13 faults 9, 10, 11)."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import (
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    RelatedNodeInfo,
    TextNode,
)
from pydantic import ValidationError

from crossrank import Reranker
from crossrank.langchain import CrossRankCompressor, HuggingFaceCrossEncoder
from crossrank.llama_index import CrossRankRerank, FlagEmbeddingReranker, SentenceTransformerRerank
from crossrank.validation import check_threshold

QUERY = "Why is Mars red?"
TEXTS = ["Mars is red because of iron oxide.", "Jupiter is large.", "Paris has a tower."]


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(
                id_=f"n{i}",
                text=t,
                metadata={"tags": ["a", "b"], "n": i},
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc{i}")},
            ),
            score=0.1 * (i + 1),
        )
        for i, t in enumerate(TEXTS)
    ]


@pytest.mark.parametrize("bad", [True, "0.5", [], float("nan"), math.inf])
def test_bad_threshold_is_refused_everywhere(bad: object, tiny_reranker: Reranker) -> None:
    with pytest.raises((TypeError, ValueError), match="threshold"):
        check_threshold(bad)
    for adapter in (CrossRankCompressor, CrossRankRerank):
        for name in ("threshold", "score_threshold"):
            with pytest.raises((TypeError, ValueError), match="threshold"):
                adapter(model=tiny_reranker, **{name: bad})


def test_threshold_and_its_alias_are_one_setting(tiny_reranker: Reranker) -> None:
    assert CrossRankRerank(model=tiny_reranker, score_threshold=0.5).threshold == 0.5
    assert CrossRankCompressor(model=tiny_reranker, threshold=1).threshold == 1.0
    with pytest.raises(ValidationError, match="pass only threshold"):
        CrossRankRerank(threshold=0.1, score_threshold=0.2)


def test_every_engine_option_is_a_field_checked_by_engine_options() -> None:
    from crossrank.options import option_fields

    for field in option_fields(flags_only=False):
        assert field.name in CrossRankRerank.model_fields
        assert field.name in CrossRankCompressor.model_fields
    with pytest.raises(ValidationError, match="chunk_overlap must be an int >= 0"):
        CrossRankRerank(model="m", chunk_overlap=-1)
    with pytest.raises(ValidationError, match="quantize=True needs backend='onnx'"):
        CrossRankCompressor(model="m", quantize=True)
    assert CrossRankRerank(model="m", max_batch_tokens=4096).batch_tokens == 4096
    secret = CrossRankRerank(model="m", cache="redis://:hunter2@localhost:6379/0")
    assert "hunter2" not in repr(secret)


def test_peer_parameter_names() -> None:
    flag = FlagEmbeddingReranker(model="m", top_n=3, use_fp16=True)
    assert (flag.dtype, flag.normalize, flag.top_n) == ("float16", False, 3)
    assert FlagEmbeddingReranker(use_fp16=False).dtype == "float32"
    assert (FlagEmbeddingReranker().top_n, FlagEmbeddingReranker().model) == (
        2,
        "BAAI/bge-reranker-large",
    )
    sbert = SentenceTransformerRerank(
        model="m", device="cpu", keep_retrieval_score=True, trust_remote_code=False
    )
    assert (sbert.top_n, sbert.device, sbert.keep_retrieval_score) == (2, "cpu", True)
    hf = HuggingFaceCrossEncoder(model_name="m", model_kwargs={"device": "cpu", "max_length": 64})
    assert (hf.model, hf.device, hf.max_length) == ("m", "cpu", 64)
    assert HuggingFaceCrossEncoder().model == "BAAI/bge-reranker-base"
    with pytest.raises(ValidationError, match=r"model_kwargs\['activation_fn'\] has no crossrank"):
        HuggingFaceCrossEncoder(model_kwargs={"activation_fn": None})
    with pytest.raises(ValidationError, match="use_fp16 and dtype name the same setting"):
        FlagEmbeddingReranker(use_fp16=True, dtype="bfloat16")


def test_drop_ins_score_on_their_peers_scale(model_path: str, tiny_reranker: Reranker) -> None:
    logits = tiny_reranker.score(QUERY, TEXTS, normalize=False)
    flag = FlagEmbeddingReranker(model=model_path, device="cpu", top_n=None)
    got = {n.node.node_id: n.score for n in flag.postprocess_nodes(nodes(), query_str=QUERY)}
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes()]
    want = tiny_reranker.score(QUERY, texts, normalize=False)
    assert got == pytest.approx({f"n{i}": float(s) for i, s in enumerate(want)}, abs=1e-5)
    hf = HuggingFaceCrossEncoder(model_name=model_path, model_kwargs={"device": "cpu"})
    probs = hf.score([(QUERY, t) for t in TEXTS])
    assert probs == pytest.approx([1 / (1 + math.exp(-x)) for x in logits], abs=1e-5)


def test_added_keys_never_reach_the_scored_or_llm_text(tiny_reranker: Reranker) -> None:
    """Fault 9: a second stage scores the same text as the first."""
    first = CrossRankRerank(model=tiny_reranker, top_n=None, keep_retrieval_score=True)
    once = first.postprocess_nodes(nodes(), query_str=QUERY)
    for n in once:
        assert "retrieval_score" in n.node.metadata
        for mode in (MetadataMode.EMBED, MetadataMode.LLM):
            assert "retrieval_score" not in n.node.get_content(metadata_mode=mode)
    twice = first.postprocess_nodes(once, query_str=QUERY)
    assert {n.node.node_id: n.score for n in twice} == pytest.approx(
        {n.node.node_id: n.score for n in once}, abs=1e-6
    )


def test_outputs_share_nothing_with_inputs(tiny_reranker: Reranker) -> None:
    """Fault 11: nested metadata and relationships are copies."""
    given = nodes()
    before = copy.deepcopy(given)
    out = CrossRankRerank(model=tiny_reranker, top_n=None).postprocess_nodes(given, query_str=QUERY)
    for n in out:
        n.node.metadata["tags"].append("mutated")
        n.node.relationships[NodeRelationship.SOURCE].metadata["x"] = 1
    assert given == before
    docs = [Document(page_content=t, metadata={"tags": ["a"]}) for t in TEXTS]
    docs_before = copy.deepcopy(docs)
    ranked = CrossRankCompressor(model=tiny_reranker, top_n=None).compress_documents(docs, QUERY)
    for d in ranked:
        d.metadata["tags"].append("mutated")
    assert docs == docs_before
