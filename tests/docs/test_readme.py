"""Every fenced ``python`` block of README.md runs as written, offline.

The only substitution: the Hub model ``BAAI/bge-reranker-v2-m3`` becomes the tiny random
model of the same architecture (``tiny_model_dir``), as if the reader had downloaded it. The
objects a fragment takes from the reader's own code get small stand-ins beside it:
``vectorstore`` (a LangChain in-memory store), ``index`` (a LlamaIndex vector index, with a
mock LLM), and, for the Cohere client, a crossrank server on a free port with
``CROSSRANK_API_KEY`` set. Each block runs with only the extra the README names for it
(importorskip says which is missing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
HUB_MODEL = "BAAI/bge-reranker-v2-m3"
PASSAGES = [
    "Mars looks red because iron oxide dust covers its surface.",
    "Jupiter is the largest planet in the solar system.",
    "The Eiffel Tower is in Paris.",
]
#: The modules each kind of block needs (the extra the README names for it).
NEEDS = {"langchain": "langchain_classic", "llama_index": "llama_index.core", "cohere": "cohere"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_the_snippets_this_file_knows() -> None:
    blocks = python_blocks()
    assert len(blocks) == 6, "a snippet was added or removed: check its stand-ins here"


def _vectorstore() -> Any:
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    return InMemoryVectorStore.from_texts(PASSAGES, DeterministicFakeEmbedding(size=16))


def _index() -> Any:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    Settings.llm = MockLLM(max_tokens=8)
    return VectorStoreIndex.from_documents(
        [Document(text=t) for t in PASSAGES], embed_model=MockEmbedding(embed_dim=16)
    )


@pytest.fixture
def cohere_server(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from crossrank import Reranker
    from crossrank.server import create_app
    from crossrank.server.runner import BackgroundServer
    from crossrank.server.settings import ServerSettings

    monkeypatch.setenv("CROSSRANK_API_KEY", "readme-key")
    app = create_app(Reranker(str(tiny_model_dir), device="cpu"), ServerSettings("readme-key"))
    with BackgroundServer(app) as server:
        server.wait_ready()
        yield server.url


STAND_INS: dict[str, Callable[[], Any]] = {"vectorstore": _vectorstore, "index": _index}


@pytest.mark.parametrize("number", range(len(python_blocks())), ids=lambda n: f"block{n + 1}")
def test_readme_snippet_runs(
    number: int, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    code = python_blocks()[number]
    for marker, module in NEEDS.items():
        if f"import {marker}" in code or f"from {marker}" in code:
            pytest.importorskip(module)
    code = code.replace(HUB_MODEL, str(tiny_model_dir))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for name, make in STAND_INS.items():
        if re.search(rf"\b{name}\.", code):
            namespace[name] = make()
    if "cohere.ClientV2" in code:
        url = request.getfixturevalue("cohere_server")
        code = code.replace("http://127.0.0.1:8000", url)
    exec(compile(code, f"README.md python block {number + 1}", "exec"), namespace)
