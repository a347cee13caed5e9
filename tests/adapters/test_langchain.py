"""CrossRankCompressor / CrossRankCrossEncoder inside real LangChain retrieval over FAISS."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")
pytest.importorskip("langchain_community")
pytest.importorskip("faiss")

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
from langchain_community.vectorstores import FAISS
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from pydantic import ValidationError

from crossrank import Reranker
from crossrank.langchain import CrossRankCompressor, CrossRankCrossEncoder
from crossrank.loading import ModelLoadError

MISSING_MODEL = "/nonexistent/crossrank-model"
RETRIEVE = 50
TOP_N = 5


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over a loaded SentenceTransformer (no hub access needed)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.fixture(scope="module")
def store(passages: list[dict[str, Any]], minilm: Any) -> FAISS:
    docs = [Document(page_content=p["text"], metadata=p["metadata"], id=p["id"]) for p in passages]
    return FAISS.from_documents(docs, MiniLMEmbeddings(minilm))


@pytest.fixture(scope="module")
def query(passages: list[dict[str, Any]]) -> str:
    return passages[3]["question"]


@pytest.fixture(scope="module")
def retrieved(store: FAISS, query: str) -> list[Document]:
    docs = store.as_retriever(search_kwargs={"k": RETRIEVE}).invoke(query)
    assert len(docs) == min(RETRIEVE, store.index.ntotal)
    return docs


@pytest.fixture(scope="module")
def want(tiny_reranker: Reranker, query: str, retrieved: list[Document]) -> list[tuple[str, float]]:
    return reference(tiny_reranker, query, retrieved)


@pytest.fixture(scope="module")
def few(retrieved: list[Document]) -> list[Document]:
    """Ten retrieved documents, for checks that need no full ranking (faster)."""
    return retrieved[:10]


def reference(reranker: Reranker, query: str, docs: list[Document]) -> list[tuple[str, float]]:
    """(id, score) best first, from the engine's scores called directly."""
    scores = reranker.score(query, [d.page_content for d in docs])
    return [(docs[i].id, float(scores[i])) for i in np.argsort(-scores, kind="stable")]


def ids_scores(docs: list[Document], key: str = "relevance_score") -> list[tuple[str, float]]:
    return [(d.id, d.metadata[key]) for d in docs]


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)


def test_contextual_compression_retriever_reranks_50_to_5(
    store: FAISS,
    query: str,
    retrieved: list[Document],
    want: list[tuple[str, float]],
    model_path: str,
) -> None:
    retriever = ContextualCompressionRetriever(
        base_compressor=CrossRankCompressor(model=model_path, device="cpu", top_n=TOP_N),
        base_retriever=store.as_retriever(search_kwargs={"k": RETRIEVE}),
    )
    out = retriever.invoke(query)
    assert_same_ranking(ids_scores(out), want[:TOP_N])
    by_id = {d.id: d for d in retrieved}
    for doc in out:
        score = doc.metadata["relevance_score"]
        assert type(score) is float
        assert doc.page_content == by_id[doc.id].page_content
        assert {k: v for k, v in doc.metadata.items() if k != "relevance_score"} == by_id[
            doc.id
        ].metadata


async def test_ainvoke_goes_through_the_async_engine(
    store: FAISS,
    query: str,
    retrieved: list[Document],
    want: list[tuple[str, float]],
    model_path: str,
) -> None:
    compressor = CrossRankCompressor(model=model_path, device="cpu", top_n=TOP_N)
    retriever = ContextualCompressionRetriever(
        base_compressor=compressor,
        base_retriever=store.as_retriever(search_kwargs={"k": RETRIEVE}),
    )
    passes: list[tuple[int, int]] = []
    engine = await compressor.aengine()
    # only the micro-batching queue (the async path) reports forward passes
    unsubscribe = engine.subscribe(lambda pairs, tokens: passes.append((pairs, tokens)))
    try:
        out = await retriever.ainvoke(query)
    finally:
        unsubscribe()
    assert sum(p for p, _ in passes) == len(retrieved)
    assert_same_ranking(ids_scores(out), want[:TOP_N])


@pytest.mark.parametrize("top_n", [1, 3, None])
def test_top_n(few: list[Document], query: str, tiny_reranker: Reranker, top_n: int | None) -> None:
    out = CrossRankCompressor(model=tiny_reranker, top_n=top_n).compress_documents(few, query)
    want = reference(tiny_reranker, query, few)
    assert_same_ranking(ids_scores(out), want if top_n is None else want[:top_n])
    assert len(out) == (len(few) if top_n is None else top_n)


def test_threshold_is_applied_before_top_n(
    retrieved: list[Document], query: str, want: list[tuple[str, float]], tiny_reranker: Reranker
) -> None:
    threshold = want[2][1]  # exactly three documents score >= the third best
    kept = CrossRankCompressor(model=tiny_reranker, top_n=TOP_N, score_threshold=threshold)
    assert_same_ranking(ids_scores(kept.compress_documents(retrieved, query)), want[:3])
    everything = CrossRankCompressor(model=tiny_reranker, top_n=None, score_threshold=want[-1][1])
    assert len(everything.compress_documents(retrieved, query)) == len(retrieved)
    above_all = CrossRankCompressor(model=tiny_reranker, score_threshold=want[0][1] + 1e-3)
    assert above_all.compress_documents(retrieved, query) == []


def test_score_key_and_inputs_untouched(
    few: list[Document], query: str, tiny_reranker: Reranker
) -> None:
    before = copy.deepcopy(few)
    out = CrossRankCompressor(model=tiny_reranker, score_key="ce").compress_documents(few, query)
    assert few == before
    assert all("ce" not in d.metadata for d in few)
    assert all(type(d.metadata["ce"]) is float and "relevance_score" not in d.metadata for d in out)
    assert not {id(d) for d in out} & {id(d) for d in few}
    assert not {id(d.metadata) for d in out} & {id(d.metadata) for d in few}


def test_empty_texts_are_scored_not_dropped(query: str, tiny_reranker: Reranker) -> None:
    docs = [Document(page_content=t, id=str(i)) for i, t in enumerate(["Mars", "", "Jupiter", ""])]
    out = CrossRankCompressor(model=tiny_reranker, top_n=None).compress_documents(docs, query)
    assert sorted(d.id for d in out) == ["0", "1", "2", "3"]
    assert_same_ranking(ids_scores(out), reference(tiny_reranker, query, docs))


async def test_empty_input_never_loads_the_model() -> None:
    compressor = CrossRankCompressor(model=MISSING_MODEL)
    assert compressor.compress_documents([], "a query") == []
    assert await compressor.acompress_documents([], "a query") == []
    assert CrossRankCrossEncoder(model=MISSING_MODEL).score([]) == []
    with pytest.raises(ModelLoadError, match="does not exist"):
        compressor.compress_documents([Document(page_content="x")], "a query")


def test_bad_input_names_the_item(tiny_reranker: Reranker) -> None:
    compressor = CrossRankCompressor(model=tiny_reranker)
    with pytest.raises(TypeError, match=r"documents\[1\] must be a Document, got str"):
        compressor.compress_documents([Document(page_content="a"), "b"], "q")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="query must not be empty"):
        compressor.compress_documents([Document(page_content="a")], "  ")
    with pytest.raises(ValueError, match="query must not be empty"):
        compressor.compress_documents([], "")
    with pytest.raises(ValidationError, match="top_n must be a positive int"):
        CrossRankCompressor(top_n=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CrossRankCompressor(topn=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"engine options \['device'\] apply only"):
        CrossRankCompressor(model=tiny_reranker, device="cpu")


def test_cross_encoder_in_langchain_cross_encoder_reranker(
    store: FAISS,
    query: str,
    retrieved: list[Document],
    want: list[tuple[str, float]],
    model_path: str,
    tiny_reranker: Reranker,
) -> None:
    encoder = CrossRankCrossEncoder(model=model_path, device="cpu")
    pairs = [(query, d.page_content) for d in retrieved]
    scores = encoder.score(pairs)
    assert all(type(s) is float for s in scores)
    assert dict(zip([d.id for d in retrieved], scores, strict=True)) == pytest.approx(
        dict(want), abs=1e-6
    )
    retriever = ContextualCompressionRetriever(
        base_compressor=CrossEncoderReranker(model=encoder, top_n=TOP_N),
        base_retriever=store.as_retriever(search_kwargs={"k": RETRIEVE}),
    )
    assert [d.id for d in retriever.invoke(query)] == [i for i, _ in want[:TOP_N]]


async def test_best_span_goes_to_metadata_as_a_list(
    few: list[Document], query: str, span_reranker: Reranker, tiny_reranker: Reranker
) -> None:
    compressor = CrossRankCompressor(model=span_reranker)
    for out in (
        compressor.compress_documents(few, query),
        await compressor.acompress_documents(few, query),
    ):
        assert [d.metadata["relevance_span"] for d in out] == [
            [1, len(d.page_content)] for d in out
        ]
    plain = CrossRankCompressor(model=tiny_reranker).compress_documents(few, query)
    assert all("relevance_span" not in d.metadata for d in plain)


def test_pickle_round_trip_without_weights(
    few: list[Document], query: str, model_path: str
) -> None:
    compressor = CrossRankCompressor(model=model_path, device="cpu", top_n=3, score_key="s")
    out = compressor.compress_documents(few, query)
    payload = pickle.dumps(compressor)
    assert len(payload) < 4096  # the tiny model's weights alone are ~65 MB
    clone = pickle.loads(payload)
    assert clone.model_dump() == compressor.model_dump()
    assert clone.compress_documents(few, query) == out
    assert clone.engine is compressor.engine  # re-resolved through the shared registry
    with pytest.raises(TypeError, match="cannot be serialized"):
        pickle.dumps(CrossRankCompressor(model=compressor.engine))
