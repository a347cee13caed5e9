"""CrossRankRerank inside a real LlamaIndex VectorStoreIndex over FAISS."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.vector_stores.faiss")
pytest.importorskip("faiss")

import faiss
from llama_index.core import Settings, StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.vector_stores.faiss import FaissVectorStore
from pydantic import ValidationError

from crossrank import Reranker
from crossrank.llama_index import CrossRankRerank
from crossrank.loading import ModelLoadError

MISSING_MODEL = "/nonexistent/crossrank-model"
RETRIEVE = 50
TOP_N = 5


class MiniLMEmbedding(BaseEmbedding):
    """LlamaIndex embedding over a loaded SentenceTransformer (no hub access needed)."""

    _model: Any = PrivateAttr()

    def __init__(self, model: Any) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2")
        self._model = model

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, normalize_embeddings=True).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


class EventCollector(BaseEventHandler):
    """Collects every instrumentation event dispatched while it is attached."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "EventCollector"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def rerank_events(self) -> list[BaseEvent]:
        return [e for e in self.events if isinstance(e, (ReRankStartEvent, ReRankEndEvent))]


@pytest.fixture(scope="module")
def index(passages: list[dict[str, Any]], minilm: Any) -> Iterator[VectorStoreIndex]:
    previous_llm = Settings._llm
    Settings.llm = MockLLM()
    embedding = MiniLMEmbedding(minilm)
    nodes = [TextNode(id_=p["id"], text=p["text"], metadata=p["metadata"]) for p in passages]
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(minilm.get_embedding_dimension()))
    yield VectorStoreIndex(
        nodes,
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embedding,
    )
    Settings._llm = previous_llm


@pytest.fixture(scope="module")
def query(passages: list[dict[str, Any]]) -> str:
    return passages[7]["question"]


@pytest.fixture(scope="module")
def retrieved(index: VectorStoreIndex, query: str) -> list[NodeWithScore]:
    nodes = index.as_retriever(similarity_top_k=RETRIEVE).retrieve(query)
    assert len(nodes) == min(RETRIEVE, len(index.docstore.docs))
    return nodes


def reference(
    reranker: Reranker, query: str, nodes: list[NodeWithScore]
) -> list[tuple[str, float]]:
    """(node id, score) best first, from the engine's scores called directly on the texts
    LlamaIndex embeds (metadata included)."""
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    scores = reranker.score(query, texts)
    return [(nodes[i].node.node_id, float(scores[i])) for i in np.argsort(-scores, kind="stable")]


@pytest.fixture(scope="module")
def want(
    tiny_reranker: Reranker, query: str, retrieved: list[NodeWithScore]
) -> list[tuple[str, float]]:
    return reference(tiny_reranker, query, retrieved)


@pytest.fixture(scope="module")
def few(retrieved: list[NodeWithScore]) -> list[NodeWithScore]:
    """Ten retrieved nodes, for checks that need no full ranking (faster)."""
    return retrieved[:10]


@pytest.fixture
def collector() -> Iterator[EventCollector]:
    handler = EventCollector()
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def ids_scores(nodes: list[NodeWithScore]) -> list[tuple[str, float | None]]:
    return [(n.node.node_id, n.score) for n in nodes]


def assert_same_ranking(got: list[tuple[str, Any]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)


def test_query_engine_end_to_end(
    index: VectorStoreIndex,
    query: str,
    want: list[tuple[str, float]],
    model_path: str,
    collector: EventCollector,
) -> None:
    engine = index.as_query_engine(
        similarity_top_k=RETRIEVE,
        node_postprocessors=[CrossRankRerank(model=model_path, device="cpu", top_n=TOP_N)],
    )
    response = engine.query(query)
    assert str(response)  # MockLLM answered from the reranked context
    assert_same_ranking(ids_scores(response.source_nodes), want[:TOP_N])
    assert all(type(n.score) is float for n in response.source_nodes)
    start, end = collector.rerank_events()
    assert isinstance(start, ReRankStartEvent) and isinstance(end, ReRankEndEvent)
    assert len(start.nodes) == RETRIEVE and start.top_n == TOP_N
    assert start.model_name == model_path
    assert [n.node.node_id for n in end.nodes] == [i for i, _ in want[:TOP_N]]


async def test_async_query_engine_goes_through_the_async_engine(
    index: VectorStoreIndex,
    query: str,
    want: list[tuple[str, float]],
    model_path: str,
    collector: EventCollector,
) -> None:
    rerank = CrossRankRerank(model=model_path, device="cpu", top_n=TOP_N)
    engine = index.as_query_engine(similarity_top_k=RETRIEVE, node_postprocessors=[rerank])
    passes: list[int] = []
    reranker = await rerank.aengine()
    # only the micro-batching queue (the async path) reports forward passes
    unsubscribe = reranker.subscribe(lambda pairs, tokens: passes.append(pairs))
    try:
        response = await engine.aquery(query)
    finally:
        unsubscribe()
    assert sum(passes) == RETRIEVE
    assert_same_ranking(ids_scores(response.source_nodes), want[:TOP_N])
    assert [type(e) for e in collector.rerank_events()] == [ReRankStartEvent, ReRankEndEvent]


@pytest.mark.parametrize("top_n", [1, 3, None])
def test_top_n(
    few: list[NodeWithScore], query: str, tiny_reranker: Reranker, top_n: int | None
) -> None:
    out = CrossRankRerank(model=tiny_reranker, top_n=top_n).postprocess_nodes(few, query_str=query)
    want = reference(tiny_reranker, query, few)
    assert_same_ranking(ids_scores(out), want if top_n is None else want[:top_n])
    assert len(out) == (len(few) if top_n is None else top_n)


def test_threshold_is_applied_before_top_n(
    retrieved: list[NodeWithScore],
    query: str,
    want: list[tuple[str, float]],
    tiny_reranker: Reranker,
) -> None:
    threshold = want[2][1]  # exactly three nodes score >= the third best
    kept = CrossRankRerank(model=tiny_reranker, top_n=TOP_N, score_threshold=threshold)
    assert_same_ranking(ids_scores(kept.postprocess_nodes(retrieved, query_str=query)), want[:3])
    above_all = CrossRankRerank(model=tiny_reranker, score_threshold=want[0][1] + 1e-3)
    assert above_all.postprocess_nodes(retrieved, query_str=query) == []


def test_inputs_untouched_and_retrieval_score_kept(
    few: list[NodeWithScore], query: str, tiny_reranker: Reranker
) -> None:
    before = copy.deepcopy(few)
    rerank = CrossRankRerank(model=tiny_reranker, top_n=None, keep_retrieval_score=True)
    out = rerank.postprocess_nodes(few, QueryBundle(query))
    assert few == before
    assert all("retrieval_score" not in n.node.metadata for n in few)
    by_id = {n.node.node_id: n for n in few}
    for n in out:
        original = by_id[n.node.node_id]
        assert n is not original and n.node is not original.node
        assert n.node.metadata == {**original.node.metadata, "retrieval_score": original.score}
        assert n.node.get_content() == original.node.get_content()
        assert type(n.score) is float


def test_metadata_mode_sets_the_scored_text(
    few: list[NodeWithScore], query: str, tiny_reranker: Reranker
) -> None:
    rerank = CrossRankRerank(model=tiny_reranker, top_n=None, metadata_mode=MetadataMode.NONE)
    texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in few]
    scores = tiny_reranker.score(query, texts)
    by_id = {n.node.node_id: float(s) for n, s in zip(few, scores, strict=True)}
    out = rerank.postprocess_nodes(few, query_str=query)
    assert {n.node.node_id: n.score for n in out} == pytest.approx(by_id, abs=1e-6)


def test_empty_texts_are_scored_not_dropped(query: str, tiny_reranker: Reranker) -> None:
    nodes = [NodeWithScore(node=TextNode(id_=f"n{i}", text=t)) for i, t in enumerate(["a", "", ""])]
    out = CrossRankRerank(model=tiny_reranker, top_n=None).postprocess_nodes(nodes, query_str=query)
    assert_same_ranking(ids_scores(out), reference(tiny_reranker, query, nodes))


async def test_empty_input_never_loads_the_model_and_still_ends(collector: EventCollector) -> None:
    rerank = CrossRankRerank(model=MISSING_MODEL)
    assert rerank.postprocess_nodes([], query_str="a query") == []
    assert await rerank.apostprocess_nodes([], query_str="a query") == []
    events = collector.rerank_events()
    assert [type(e) for e in events] == [ReRankStartEvent, ReRankEndEvent] * 2
    assert all(e.nodes == [] for e in events)
    with pytest.raises(ModelLoadError, match="does not exist"):
        rerank.postprocess_nodes([NodeWithScore(node=TextNode(text="x"))], query_str="a query")


def test_bad_input(few: list[NodeWithScore], tiny_reranker: Reranker) -> None:
    rerank = CrossRankRerank(model=tiny_reranker)
    with pytest.raises(ValueError, match="needs a query"):
        rerank.postprocess_nodes(few)
    with pytest.raises(TypeError, match=r"nodes\[1\] must be a NodeWithScore, got TextNode"):
        rerank.postprocess_nodes([few[0], few[1].node], query_str="q")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="query must not be empty"):
        rerank.postprocess_nodes(few, query_str=" ")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CrossRankRerank(topn=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="top_n must be a positive int"):
        CrossRankRerank(top_n=-1)


def test_legacy_callback_event(
    few: list[NodeWithScore], query: str, tiny_reranker: Reranker
) -> None:
    debug = LlamaDebugHandler(print_trace_on_end=False)
    rerank = CrossRankRerank(
        model=tiny_reranker, top_n=2, callback_manager=CallbackManager([debug])
    )
    out = rerank.postprocess_nodes(few, query_str=query)
    ((start, end),) = debug.get_event_pairs(CBEventType.RERANKING)
    assert start.payload[EventPayload.QUERY_STR] == query
    assert start.payload[EventPayload.TOP_K] == 2
    assert start.payload[EventPayload.NODES] == few
    assert end.payload[EventPayload.NODES] == out


async def test_best_span_goes_to_metadata_hidden_from_the_llm(
    few: list[NodeWithScore], query: str, span_reranker: Reranker
) -> None:
    rerank = CrossRankRerank(model=span_reranker, top_n=3)
    for out in (
        rerank.postprocess_nodes(few, query_str=query),
        await rerank.apostprocess_nodes(few, query_str=query),
    ):
        for n in out:
            text = n.node.get_content(metadata_mode=MetadataMode.EMBED)
            assert n.node.metadata["relevance_span"] == [1, len(text)]
            assert "relevance_span" not in n.node.get_content(metadata_mode=MetadataMode.LLM)
            assert "relevance_span" not in n.node.get_content(metadata_mode=MetadataMode.EMBED)
    assert all("relevance_span" not in n.node.metadata for n in few)


def test_serialization_round_trip_without_weights(
    few: list[NodeWithScore], query: str, model_path: str
) -> None:
    rerank = CrossRankRerank(
        model=model_path, device="cpu", top_n=3, score_threshold=0.1, keep_retrieval_score=True
    )
    out = rerank.postprocess_nodes(few, query_str=query)
    data = rerank.to_dict()
    assert data["class_name"] == "CrossRankRerank"
    assert json.loads(rerank.to_json()) == json.loads(json.dumps(data))
    payload = pickle.dumps(rerank)
    assert len(payload) < 4096  # the tiny model's weights alone are ~65 MB
    for clone in (CrossRankRerank.from_dict(data), pickle.loads(payload)):
        assert clone.to_dict() == data
        assert clone.postprocess_nodes(few, query_str=query) == out
        assert clone.engine is rerank.engine  # re-resolved through the shared registry
    # nothing loads before first use: a model that does not exist round-trips fine
    lazy = pickle.loads(pickle.dumps(CrossRankRerank.from_dict({"model": MISSING_MODEL})))
    assert lazy.model == MISSING_MODEL
    with pytest.raises(TypeError, match="cannot be serialized"):
        pickle.dumps(CrossRankRerank(model=rerank.engine))
    with pytest.raises(Exception, match="cannot be serialized"):
        CrossRankRerank(model=rerank.engine).to_dict()
