"""Building blocks of the RAG pipeline: corpora, FAISS retrieval, prompt, LLM client,
evaluation and model loading."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from crossrank import Reranker
from crossrank.loading import ModelLoadError
from crossrank.rag import models
from crossrank.rag.corpus import Corpus, Passage, Query, load_dataset, load_xquad_r, xquad_dir
from crossrank.rag.evaluate import evaluate
from crossrank.rag.llm import LLMConfig, LLMError, build_prompt, chat, complete
from crossrank.rag.pipeline import Pipeline, QueryRun, Ranked
from crossrank.rag.retrieval import DenseIndex, Hit

if TYPE_CHECKING:
    from tests.rag.conftest import Expected, StubLLMServer


# ------------------------------------------------------------------------------ corpora
def test_demo_corpus_is_package_data(demo_corpus: Corpus) -> None:
    assert resources.files("crossrank").joinpath("data", "demo_corpus.json").is_file()
    assert len(demo_corpus.passages) == 249 and len(demo_corpus.queries) == 36
    assert {p.lang for p in demo_corpus.passages} == {"zh", "en", "ja", "ko", "fr", "de"}
    for query in demo_corpus.queries:
        assert 2 in query.relevant.values(), query.id
        for pid in query.relevant:
            demo_corpus.passage(pid)  # every label resolves
    assert demo_corpus.query_by_text("pandas skip first two rows") == demo_corpus.query("q06")
    assert demo_corpus.query_by_text("not a labelled query") is None


def test_corpus_rejects_bad_ids() -> None:
    passage = Passage("a", "text", "en")
    with pytest.raises(ValueError, match=r"passages\[1\] has a missing or duplicate id"):
        Corpus("bad", (passage, passage), ())
    with pytest.raises(ValueError, match=r"query q1 labels unknown passages \['zzz'\]"):
        Corpus("bad", (passage,), (Query("q1", "?", "en", {"a": 1, "zzz": 2}),))
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_xquad_r_tasks_follow_the_data(shared: Path | None) -> None:
    if shared is None:
        pytest.skip("../shared/data/xquad-r is absent")
    directory = xquad_dir(shared)
    tasks = load_xquad_r(shared)
    assert list(tasks) == ["en-en", "zh-zh", "zh-en"]
    raw = {lang: json.loads((directory / f"{lang}.json").read_text()) for lang in ("en", "zh")}
    # Independent walk of the raw JSON: question id -> (article, paragraph) that holds it.
    where = {
        lang: {
            qa["id"]: (a, p)
            for a, article in enumerate(data["data"])
            for p, para in enumerate(article["paragraphs"])
            for qa in para["qas"]
        }
        for lang, data in raw.items()
    }
    for task, (q_lang, p_lang) in {
        "en-en": ("en", "en"),
        "zh-zh": ("zh", "zh"),
        "zh-en": ("zh", "en"),
    }.items():
        corpus = tasks[task]
        assert len(corpus.passages) == 240 and len(corpus.queries) == 1190
        assert {p.lang for p in corpus.passages} == {p_lang}
        assert {q.lang for q in corpus.queries} == {q_lang}
        for query in corpus.queries[::97]:
            a, p = where[p_lang][query.id]
            assert dict(query.relevant) == {f"{p_lang}-{a}-{p}": 1}
            context = raw[p_lang]["data"][a]["paragraphs"][p]["context"]
            assert corpus.passage(f"{p_lang}-{a}-{p}").text == context
            if q_lang == p_lang:
                assert query.text in [
                    qa["question"] for qa in raw[q_lang]["data"][a]["paragraphs"][p]["qas"]
                ]


# ---------------------------------------------------------------------------- retrieval
def test_dense_index_returns_the_exact_top_k(
    demo_index: DenseIndex, demo_corpus: Corpus, expected: Expected
) -> None:
    questions = ["apple phone case with good drop protection", "华为手机怎么打卫星电话"]
    for question, hits in zip(questions, demo_index.search(questions, 50), strict=True):
        assert [h.rank for h in hits] == list(range(1, 51))
        expected.assert_top_k(question, [h.passage.id for h in hits])
    assert len(demo_index.search(["x"], 1000)[0]) == len(demo_corpus.passages)
    with pytest.raises(ValueError, match="k must be a positive int"):
        demo_index.search(["x"], 0)


def test_pipeline_reranks_every_retrieved_passage(
    demo_index: DenseIndex, tiny_reranker: Reranker, expected: Expected
) -> None:
    pipeline = Pipeline(demo_index, tiny_reranker, top_k=20)
    questions = ["pandas skip first two rows", "美洲豹会游泳吗", "bank account documents"]
    runs = list(pipeline.run_many(questions, batch_size=2))
    assert [r.query for r in runs] == questions
    for run in runs:
        retrieved = [h.passage.id for h in run.retrieved]
        assert len(retrieved) == 20
        assert sorted(r.hit.passage.id for r in run.reranked) == sorted(retrieved)
        scores = tiny_reranker.score(run.query, [h.passage.text for h in run.retrieved])
        order = [retrieved[i] for i in np.argsort(-scores, kind="stable")]
        assert [r.hit.passage.id for r in run.reranked] == order
        assert [r.rank for r in run.reranked] == list(range(1, 21))
        assert expected.prompt_ids(run.prompt(5)) == order[:5]
        assert set(run.timings) == {"retrieve", "rerank"}


# ------------------------------------------------------------------------------ prompt
def test_prompt_cites_passages_by_id_in_order(expected: Expected) -> None:
    prompt = build_prompt("Which is red?", [("p9", "Mars\n  is   red."), ("p1", "Grass is green.")])
    assert expected.prompt_ids(prompt) == ["p9", "p1"]
    assert "[p9] Mars is red.\n[p1] Grass is green." in prompt
    assert prompt.endswith("Question: Which is red?\nAnswer:")
    with pytest.raises(ValueError, match=r"passages\[1\] has an id that cannot be cited"):
        build_prompt("q", [("ok", "a"), ("bad]id", "b")])
    with pytest.raises(ValueError, match="question must not be empty"):
        build_prompt("  ", [("a", "b")])


# ---------------------------------------------------------------------------- LLM client
def test_llm_config_from_env(llm_server: StubLLMServer) -> None:
    key = llm_server.api_key
    assert LLMConfig.from_env({}) is None
    with pytest.raises(ValueError, match="CROSSRANK_LLM_MODEL"):
        LLMConfig.from_env({"CROSSRANK_LLM_BASE_URL": "http://x/v1"})
    config = LLMConfig.from_env(
        {
            "CROSSRANK_LLM_BASE_URL": "http://x/v1/",
            "CROSSRANK_LLM_MODEL": "m",
            "CROSSRANK_LLM_API_KEY": key,
        }
    )
    assert config is not None and config.base_url == "http://x/v1" and config.api_key == key
    assert key not in repr(config)


def test_chat_posts_an_openai_request(
    llm_server: StubLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = llm_server.api_key
    config = LLMConfig(llm_server.base_url, "stub-model", key)
    before = len(llm_server.requests)
    assert complete("the prompt", config) == llm_server.answer
    request = llm_server.requests[before]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {key}"
    assert request["body"] == {
        "model": "stub-model",
        "messages": [{"role": "user", "content": "the prompt"}],
        "temperature": 0,
    }
    assert chat([{"role": "user", "content": "x"}], config, max_tokens=7) == llm_server.answer
    assert llm_server.requests[-1]["body"]["max_tokens"] == 7
    with pytest.raises(LLMError, match=r"answered HTTP 500: .*upstream exploded") as err:
        complete("p", LLMConfig(llm_server.base_url, "broken", key))
    assert key not in str(err.value) and key not in caplog.text


def test_chat_unreachable_endpoint_is_a_clear_error() -> None:
    key = "sk-unreachable-secret"
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LLMConfig(f"http://127.0.0.1:{port}/v1", "m", key, timeout=5)
    with pytest.raises(LLMError, match="could not reach the LLM endpoint") as err:
        complete("p", config)
    assert key not in str(err.value)


# ---------------------------------------------------------------------------- evaluation
def _run(query: str, order: list[str], rerank_order: list[str], scores: list[float]) -> QueryRun:
    hits = [Hit(Passage(pid, pid, "en"), i, 1.0 - i / 100) for i, pid in enumerate(order, 1)]
    by_id = {h.passage.id: h for h in hits}
    ranked = [
        Ranked(by_id[pid], i, s)
        for i, (pid, s) in enumerate(zip(rerank_order, scores, strict=True), 1)
    ]
    return QueryRun(query, hits, ranked)


def test_evaluate_scores_our_order_with_ir_measures() -> None:
    ids = [f"d{i}" for i in range(60)]
    corpus = Corpus(
        "toy", tuple(Passage(i, i, "en") for i in ids), (Query("q", "q", "en", {"d2": 2, "d7": 1}),)
    )
    # Retrieval puts the grade-2 passage third; reranking puts it first with scores all tied,
    # which trec_eval would otherwise reorder by document id.
    retrieved = ids[:50]
    reranked = ["d2", "d0", "d1", *[d for d in retrieved if d not in ("d0", "d1", "d2")]]
    result = evaluate(corpus, [("q", _run("q", retrieved, reranked, [0.5] * 50))])
    assert result["retrieval"]["MRR@10"] == pytest.approx(1 / 3)
    assert result["retrieval+rerank"]["MRR@10"] == pytest.approx(1.0)
    assert result["retrieval"]["Recall@5"] == pytest.approx(0.5)  # d7 is at rank 8
    assert result["retrieval+rerank"]["Recall@50"] == result["retrieval"]["Recall@50"] == 1.0
    ideal = 2 + 1 / np.log2(3)  # trec_eval's linear gains: grade 2 at rank 1, grade 1 at rank 2
    got = 2 / np.log2(4)  # only d2 is in the retrieval top 5, at rank 3
    assert result["retrieval"]["nDCG@5"] == pytest.approx(got / ideal)


# ------------------------------------------------------------------------------- models
def test_local_files_only_decisions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    assert models.local_files_only(str(tiny_model_dir)) is False
    assert models.local_files_only(str(tmp_path / "missing" / "model")) is False  # loader explains
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("crossrank.loading.hub_reachable", lambda: False)
    with pytest.raises(ModelLoadError, match="Hugging Face Hub cannot be reached"):
        models.local_files_only("BAAI/bge-m3")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 turns downloads off"):
        models.local_files_only("BAAI/bge-m3")  # not cached: the remedy names the switch


def test_model_loading_errors_are_clear(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"embedding model path .* does not exist"):
        models.load_embedder(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_reranker(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"is a cross-encoder .*\(--rerank-model\)"):
        models.load_embedder(str(tiny_model_dir), device="cpu")
    assert models.load_reranker(str(tiny_model_dir), device="cpu") is models.load_reranker(
        str(tiny_model_dir), device="cpu"
    )
    assert Path(models.bundled_minilm_path(), "config.json").is_file()
