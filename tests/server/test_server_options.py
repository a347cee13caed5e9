"""``crossrank serve``'s engine options (long documents, score cache, backend, query length):
they reach the ``Reranker`` the server loads, bad values are usage errors naming the option,
and a server started with ``--cache memory --long-docs chunk`` caches and chunks over HTTP."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

import crossrank.cli.serve
import crossrank.engine
import crossrank.server.runner
from crossrank import EngineOptions, Reranker
from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer
from tests.server.helpers import metric

pytestmark = pytest.mark.timeout(300)

QUERY = "Which planet is known as the red planet?"
LONG_DOC = " ".join(
    f"Paragraph {i}: the rover measured dust, iron oxide and wind on the red planet Mars."
    for i in range(12)
)
DOCS = ["Mars is red.", "Jupiter is the largest planet.", LONG_DOC, ""]


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(crossrank.cli.serve.serve)
    return app


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ServerSettings]]:
    """What ``run_server`` was given (the model factory and the settings), instead of serving."""
    calls: list[tuple[Any, ServerSettings]] = []

    def run_server(load: Any, settings: ServerSettings, **kw: Any) -> int:
        calls.append((load, settings))
        return 0

    monkeypatch.setattr(crossrank.server.runner, "run_server", run_server)
    monkeypatch.delenv("CROSSRANK_CACHE", raising=False)
    return calls


def test_engine_options_reach_the_reranker(started, monkeypatch):
    built: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(
        crossrank.engine, "Reranker", lambda *a, **kw: built.append((a, kw)) or "engine"
    )
    result = CliRunner().invoke(
        cli(),
        [
            *("--model", "some/model", "--device", "cpu", "--max-length", "256"),
            *("--query-max-length", "64", "--max-batch-tokens", "4096"),
            *("--long-docs", "chunk", "--chunk-tokens", "100", "--chunk-overlap", "10"),
            *("--aggregate", "mean", "--cache", "redis://localhost:6379/2"),
            *("--backend", "onnx", "--quantize"),
        ],
    )
    assert result.exit_code == 0, result.output
    [(load, _)] = started
    assert not built  # the model loads in the server, not before it
    assert load() == "engine"
    expected = EngineOptions(
        device="cpu",
        max_length=256,
        query_max_length=64,
        batch_tokens=4096,
        long_docs="chunk",
        chunk_tokens=100,
        chunk_overlap=10,
        aggregate="mean",
        cache="redis://localhost:6379/2",
        backend="onnx",
        quantize=True,
    )
    assert built == [(("some/model", expected), {})]

    # the defaults are the engine's, and the cache may come from the environment
    built.clear()
    started.clear()
    result = CliRunner().invoke(cli(), [], env={"CROSSRANK_CACHE": "memory"})
    assert result.exit_code == 0, result.output
    started[0][0]()
    assert built == [(("BAAI/bge-reranker-v2-m3", EngineOptions(cache="memory")), {})]


@pytest.mark.parametrize(
    ("args", "env", "option", "message"),
    [
        (["--quantize"], {}, "--quantize", "needs backend='onnx'"),
        (["--long-docs", "paragraph"], {}, "--long-docs", "'paragraph' is not one of"),
        (["--aggregate", "median"], {}, "--aggregate", "'median' is not one of"),
        (["--backend", "tensorrt"], {}, "--backend", "'tensorrt' is not one of"),
        (["--long-docs", "chunk", "--chunk-tokens", "0"], {}, "--chunk-tokens", "positive int"),
        (["--chunk-overlap", "-1"], {}, "--chunk-overlap", "int >= 0"),
        (["--query-max-length", "0"], {}, "--query-max-length", "positive int"),
        (["--cache", "memcached://host"], {}, "--cache", "'memory', a redis:// URL"),
        ([], {"CROSSRANK_CACHE": "lru"}, "--cache", "'memory', a redis:// URL"),
        (["--ray", "--quantize"], {}, "--quantize", "needs backend='onnx'"),
    ],
)
def test_bad_engine_options_are_usage_errors_naming_the_option(started, args, env, option, message):
    result = CliRunner().invoke(cli(), args, env=env)
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert f"Invalid value for '{option}'" in output and message in output
    assert not started


def test_a_bad_cache_url_is_refused_without_its_password(started):
    result = CliRunner().invoke(cli(), ["--cache", "redis:/admin:hunter2-secret@db.internal:6379"])
    assert result.exit_code == 2
    assert "'--cache'" in result.output and "hunter2" not in result.output
    assert not started


def test_options_only_the_tokenizer_can_judge_fail_at_load(tiny_model_dir, caplog):
    """No usage error is possible before the tokenizer is known: the load fails, the server
    exits 1 and the log says why."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        cli(),
        [
            *("--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port)),
            *("--long-docs", "chunk", "--chunk-tokens", "16", "--chunk-overlap", "16"),
        ],
    )
    assert result.exit_code == 1
    assert "chunk_overlap=16 must be smaller than the window" in caplog.text


def test_cache_and_chunk_mode_over_http(started, tiny_model_dir, tiny_reranker):
    """The CLI's own factory behind the app: the second identical request is answered by the
    cache (visible on /metrics), and the long document is scored window by window."""
    result = CliRunner().invoke(
        cli(),
        [
            *("--model", str(tiny_model_dir), "--device", "cpu", "--cache", "memory"),
            *("--long-docs", "chunk", "--chunk-tokens", "16", "--max-docs", "10"),
        ],
    )
    assert result.exit_code == 0, result.output
    [(load, settings)] = started
    body = {"query": QUERY, "documents": DOCS, "return_raw_scores": True}
    with BackgroundServer(create_app(load, settings)) as server:
        server.wait_ready()
        before = httpx.get(server.url + "/metrics").text
        assert metric(before, "crossrank_cache_available") == 1
        scored_before = metric(before, "crossrank_pairs_scored_total")

        first = httpx.post(server.url + "/v1/rerank", json=body, timeout=60).json()
        after_first = httpx.get(server.url + "/metrics").text
        second = httpx.post(server.url + "/v1/rerank", json=body, timeout=60).json()
        after_second = httpx.get(server.url + "/metrics").text

    hits = metric(after_first, "crossrank_cache_hits_total")
    misses = metric(after_first, "crossrank_cache_misses_total")
    assert metric(after_second, "crossrank_cache_hits_total") == hits + len(DOCS)
    assert metric(after_second, "crossrank_cache_misses_total") == misses
    assert metric(after_second, "crossrank_cache_errors_total") == 0
    # the second request reached no model: nothing scored, no tokens computed
    windows = metric(after_first, "crossrank_pairs_scored_total") - scored_before
    assert metric(after_second, "crossrank_pairs_scored_total") - scored_before == windows
    assert second["usage"]["total_tokens"] == 0 < first["usage"]["total_tokens"]
    assert second["results"] == first["results"]

    # the long document gave several windows (the others fit in one), and its score is the
    # best of them, not the score of the whole document as one pair
    assert windows > len(DOCS)
    raw = {r["index"]: r["raw_score"] for r in first["results"]}
    chunked = Reranker(str(tiny_model_dir), device="cpu", long_docs="chunk", chunk_tokens=16)
    try:
        assert raw[2] == pytest.approx(float(chunked.score(QUERY, [LONG_DOC], normalize=False)[0]))
    finally:
        chunked.close()
    truncated = float(tiny_reranker.score(QUERY, [LONG_DOC], normalize=False)[0])
    assert raw[2] != pytest.approx(truncated)
    assert raw[0] == pytest.approx(float(tiny_reranker.score(QUERY, [DOCS[0]], normalize=False)[0]))


def test_no_cache_metrics_without_a_cache(tiny_reranker):
    with BackgroundServer(create_app(tiny_reranker)) as server:
        server.wait_ready()
        text = httpx.get(server.url + "/metrics").text
    assert "crossrank_cache" not in text
