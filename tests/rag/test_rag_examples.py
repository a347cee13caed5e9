"""The two RAG example scripts, run offline end to end: MiniLM embeddings, the tiny random
reranker, and a dry-run or stub LLM. Expectations are computed independently (brute-force
cosine retrieval, the engine's scores)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from crossrank.rag.llm import DRY_RUN_NOTICE

if TYPE_CHECKING:
    from tests.rag.conftest import Expected, StubLLMServer


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LLM_VARS = ("CROSSRANK_LLM_BASE_URL", "CROSSRANK_LLM_MODEL", "CROSSRANK_LLM_API_KEY")


def _ids(items: list[Any]) -> list[str]:
    """Passage ids of LangChain documents or LlamaIndex nodes."""
    return [item.id if hasattr(item, "page_content") else item.node.node_id for item in items]


@pytest.fixture(scope="module", params=["rag_langchain", "rag_llamaindex"])
def example(request: pytest.FixtureRequest, offline_env: dict[str, str]) -> Iterator[ModuleType]:
    """The example script imported as a module, with offline models in its environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in offline_env.items():
            patch.setenv(name, value)
        spec = importlib.util.spec_from_file_location(
            f"example_{request.param}", EXAMPLES / f"{request.param}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        yield module


def test_dry_run_prompts_with_the_reranked_top_5(
    example: ModuleType,
    expected: Expected,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in LLM_VARS:
        monkeypatch.delenv(name, raising=False)
    result = example.main(["--device", "cpu"])
    question = example.DEFAULT_QUESTION
    retrieved = _ids(result.retrieved)
    expected.assert_top_k(question, retrieved, k=50)
    reranked = _ids(result.reranked)
    assert reranked == expected.reranked(question, retrieved, n=5)
    assert expected.prompt_ids(result.prompt) == reranked  # exactly these 5, in this order
    assert result.answer is None
    out = capsys.readouterr().out
    assert DRY_RUN_NOTICE in out and result.prompt in out
    assert "RANDOM WEIGHTS" in out and "Retrieved 50" in out
    assert set(result.timings) == {"retrieve", "rerank"}


def test_llm_gets_exactly_the_printed_prompt(
    example: ModuleType,
    expected: Expected,
    llm_server: StubLLMServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in llm_server.env().items():
        monkeypatch.setenv(name, value)
    question = "bluetooth earbuds won't pair with my phone"
    before = len(llm_server.requests)
    result = example.main([question, "--device", "cpu"])
    [request] = llm_server.requests[before:]
    assert request["body"]["messages"] == [{"role": "user", "content": result.prompt}]
    assert request["body"]["model"] == "stub-model"
    assert expected.prompt_ids(result.prompt) == expected.reranked(question, _ids(result.retrieved))
    assert result.answer == llm_server.answer
    out = capsys.readouterr().out
    assert llm_server.answer in out and "DRY RUN" not in out
    assert llm_server.api_key not in out
    assert set(result.timings) == {"retrieve", "rerank", "llm"}
