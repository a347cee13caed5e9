"""LlamaIndex front door: a node postprocessor over the shared engine.

``CrossRankRerank`` goes in ``node_postprocessors=[...]`` of any query engine or retriever
pipeline. It is thin: node texts go to the engine, engine results come back as new
``NodeWithScore`` objects holding deep copies of the nodes (no output shares mutable state,
metadata or relationships, with an input). ``SentenceTransformerRerank`` and
``FlagEmbeddingReranker`` are the same with those LlamaIndex postprocessors' names and
defaults, so swapping the import line is the whole migration. Install with
``pip install crossrank[llama-index]`` (needs ``llama-index-core`` only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from crossrank.errors import require_extra

require_extra("llama_index.core", "llama-index", feature="crossrank.llama_index")

from llama_index.core.bridge.pydantic import ConfigDict, Field  # noqa: E402
from llama_index.core.callbacks import CBEventType, EventPayload  # noqa: E402
from llama_index.core.callbacks.base import EventContext  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle  # noqa: E402

from crossrank._adapter import (  # noqa: E402
    RETRIEVAL_SCORE_KEY,
    RankingConfig,
    check_items,
    span_metadata,
)
from crossrank.engine import Reranker  # noqa: E402
from crossrank.result import RerankResult  # noqa: E402

__all__ = ["CrossRankRerank", "FlagEmbeddingReranker", "SentenceTransformerRerank"]

dispatcher = get_dispatcher(__name__)


class CrossRankRerank(RankingConfig, BaseNodePostprocessor):
    """Rerank retrieved nodes with a cross-encoder, best first.

    Returns new ``NodeWithScore`` objects holding deep copies of the nodes (the inputs are
    left untouched) with the score as a plain ``float``. ``threshold`` (alias
    ``score_threshold``) is applied first, then ``top_n``. With ``keep_retrieval_score`` the
    retriever's score is kept in ``metadata["retrieval_score"]``; a long document scored by
    windows gets its best span in ``metadata["relevance_span"]``. Every key the adapter adds
    is excluded from LLM and embedding text, so a later stage scores the same text. Emits
    ``ReRankStartEvent``/``ReRankEndEvent`` and the legacy ``RERANKING`` callback event. The
    model loads on first use and is shared with every adapter using the same model and
    options; ``to_dict``/``from_dict`` and pickling carry the settings, never the weights.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    keep_retrieval_score: bool = Field(
        default=False, description="Keep the retriever's score in metadata['retrieval_score']."
    )
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.EMBED, description="Which metadata is part of the scored text."
    )

    @classmethod
    def class_name(cls) -> str:
        return "CrossRankRerank"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        with self._reranking(nodes, query_bundle) as (query, texts, finish):
            return finish(self.rank(query, texts))

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        with self._reranking(nodes, query_bundle) as (query, texts, finish):
            return finish(await self.arank(query, texts))

    @contextmanager
    def _reranking(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> Iterator[tuple[str, list[str], Callable[[list[RerankResult]], list[NodeWithScore]]]]:
        """One reranking, sync or async alike: checks the input and emits the start events,
        gives the query and texts to rank, and ``finish``, which turns the engine's results
        into the output nodes and emits the end events; inside the legacy callback event."""
        items, query = self._start(nodes, query_bundle)
        with self.callback_manager.event(
            CBEventType.RERANKING, payload=self._payload(items, query)
        ) as event:
            yield query, self._texts(items), lambda results: self._end(items, results, event)

    def _start(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[list[NodeWithScore], str]:
        if query_bundle is None:
            raise ValueError(
                "CrossRankRerank needs a query: call postprocess_nodes(nodes, query_str=...) "
                "or pass a QueryBundle"
            )
        items = check_items(nodes, NodeWithScore, "nodes")
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle,
                nodes=items,
                top_n=len(items) if self.top_n is None else self.top_n,
                model_name=self.model_name,
            )
        )
        return items, query_bundle.query_str

    def _payload(self, nodes: list[NodeWithScore], query: str) -> dict[str, object]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self.model_name,
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self.top_n,
        }

    def _texts(self, nodes: list[NodeWithScore]) -> list[str]:
        return [n.node.get_content(metadata_mode=self.metadata_mode) for n in nodes]

    def _end(
        self, nodes: list[NodeWithScore], results: list[RerankResult], event: EventContext
    ) -> list[NodeWithScore]:
        ranked = [
            NodeWithScore(node=self._copy_node(nodes[r.index], r), score=r.score) for r in results
        ]
        event.on_end(payload={EventPayload.NODES: ranked})
        dispatcher.event(ReRankEndEvent(nodes=ranked))
        return ranked

    def _copy_node(self, original: NodeWithScore, result: RerankResult) -> BaseNode:
        node = original.node.model_copy(deep=True)
        added: dict[str, object] = dict(span_metadata(result))
        if self.keep_retrieval_score:
            added[RETRIEVAL_SCORE_KEY] = original.score
        node.metadata.update(added)
        for key in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
            kept = [k for k in getattr(node, key) if k not in added]
            setattr(node, key, [*kept, *added])
        return node


class SentenceTransformerRerank(CrossRankRerank):
    """LlamaIndex's ``SentenceTransformerRerank`` over the crossrank engine: change
    ``from llama_index.core.postprocessor import SentenceTransformerRerank`` to
    ``from crossrank.llama_index import SentenceTransformerRerank``.

    Same defaults (``top_n=2``, model ``cross-encoder/stsb-distilroberta-base``) and
    parameters (``model``, ``top_n``, ``device``, ``keep_retrieval_score``,
    ``trust_remote_code``, ``cache_dir``, ``cross_encoder_kwargs``); scores are the sigmoid of
    a one-logit model's logit, as ``CrossEncoder.predict`` gives for models that name no
    other activation. ``trust_remote_code`` stays off unless set.
    """

    model: str | Reranker = Field(
        default="cross-encoder/stsb-distilroberta-base",
        description="Hugging Face id or local path of a reranker, or a loaded crossrank.Reranker.",
    )
    top_n: int | None = Field(default=2, description="Results to keep; None keeps all.")

    @classmethod
    def class_name(cls) -> str:
        return "CrossRankSentenceTransformerRerank"


class FlagEmbeddingReranker(CrossRankRerank):
    """LlamaIndex's ``FlagEmbeddingReranker`` over the crossrank engine: change
    ``from llama_index.postprocessor.flag_embedding_reranker import FlagEmbeddingReranker``
    to ``from crossrank.llama_index import FlagEmbeddingReranker``.

    Same defaults (``top_n=2``, model ``BAAI/bge-reranker-large``), parameters (``model``,
    ``top_n``, ``use_fp16``: ``True`` runs float16, ``False`` float32) and score scale: raw
    logits, as ``FlagReranker.compute_score`` returns them (``normalize=True`` for
    probabilities).
    """

    model: str | Reranker = Field(
        default="BAAI/bge-reranker-large",
        description="Hugging Face id or local path of a reranker, or a loaded crossrank.Reranker.",
    )
    top_n: int | None = Field(default=2, description="Results to keep; None keeps all.")
    normalize: Any = Field(
        default=False, description="Raw logits (False, as FlagReranker) or probabilities (True)."
    )

    @classmethod
    def class_name(cls) -> str:
        return "CrossRankFlagEmbeddingReranker"
