"""LangChain front door: a document compressor and a cross-encoder over the shared engine.

``CrossRankCompressor`` drops into ``ContextualCompressionRetriever`` (sync and async);
``CrossRankCrossEncoder`` plugs into LangChain's own ``CrossEncoderReranker``, and
``HuggingFaceCrossEncoder`` is the same with langchain-community's name and defaults, so
swapping the import line is the whole migration. All are thin: they turn ``Document``
objects into texts and engine results back into new ``Document`` objects (deep copies: no
output shares mutable state with an input). Install with ``pip install crossrank[langchain]``
(needs ``langchain-core`` only).
"""

from __future__ import annotations

from collections.abc import Sequence

from crossrank.errors import require_extra

require_extra("langchain_core", "langchain", feature="crossrank.langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.cross_encoders import BaseCrossEncoder  # noqa: E402
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from pydantic import ConfigDict, Field  # noqa: E402

from crossrank._adapter import (  # noqa: E402
    EngineConfig,
    RankingConfig,
    check_items,
    span_metadata,
)
from crossrank.engine import Reranker  # noqa: E402
from crossrank.result import RerankResult  # noqa: E402
from crossrank.validation import check_pairs  # noqa: E402

__all__ = ["CrossRankCompressor", "CrossRankCrossEncoder", "HuggingFaceCrossEncoder"]


class CrossRankCompressor(RankingConfig, BaseDocumentCompressor):
    """Rerank retrieved documents with a cross-encoder, best first, writing each score.

    Returns new ``Document`` objects (deep copies: the inputs are left untouched) with the
    original ``id``, ``page_content`` and metadata, plus the score as a plain ``float`` under
    ``score_key`` (and ``relevance_span`` when the engine scored a long document by windows).
    ``threshold`` (alias ``score_threshold``) is applied first, then ``top_n``. The model loads on first use and is
    shared with every other adapter using the same model and options.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    score_key: str = Field(
        default="relevance_score", description="Metadata key the score is written under."
    )

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> list[Document]:
        """Rerank ``documents`` for ``query``; ``callbacks`` are accepted and unused."""
        docs, texts = _checked_texts(documents)
        return self._to_documents(docs, self.rank(query, texts))

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> list[Document]:
        """Async :meth:`compress_documents`, sharing forward passes with concurrent calls."""
        docs, texts = _checked_texts(documents)
        return self._to_documents(docs, await self.arank(query, texts))

    def _to_documents(self, docs: list[Document], results: list[RerankResult]) -> list[Document]:
        out = []
        for r in results:
            doc = docs[r.index].model_copy(deep=True)
            doc.metadata.update({**span_metadata(r), self.score_key: r.score})
            out.append(doc)
        return out


def _checked_texts(documents: Sequence[Document]) -> tuple[list[Document], list[str]]:
    """``documents`` as a list (a ``TypeError`` names an item that is not a ``Document``)
    and their texts."""
    docs = check_items(documents, Document, "documents")
    return docs, [d.page_content for d in docs]


class CrossRankCrossEncoder(EngineConfig, BaseCrossEncoder):
    """A LangChain ``BaseCrossEncoder`` over the shared engine, e.g. for
    ``CrossEncoderReranker(model=CrossRankCrossEncoder(), top_n=5)``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        """Scores of ``[(query, document), ...]`` in input order, as plain floats."""
        if not check_pairs(text_pairs)[0]:
            return []
        raw = self.engine.score_pairs(text_pairs, instruction=self.instruction)
        scores: list[float] = raw.tolist()
        return scores


class HuggingFaceCrossEncoder(CrossRankCrossEncoder):
    """langchain-community's ``HuggingFaceCrossEncoder`` over the crossrank engine: change
    ``from langchain_community.cross_encoders import HuggingFaceCrossEncoder`` to
    ``from crossrank.langchain import HuggingFaceCrossEncoder``.

    Same default model (``BAAI/bge-reranker-base``), ``model_name`` and ``model_kwargs``
    (its ``device``, ``max_length``, ``trust_remote_code``, ``revision``,
    ``local_files_only``, ``cache_folder``; other keys are refused with what to use), and the
    same score scale (the sigmoid of a one-logit model's logit).
    """

    model: str | Reranker = Field(
        default="BAAI/bge-reranker-base",
        description="Hugging Face id or local path of a reranker, or a loaded crossrank.Reranker.",
    )
