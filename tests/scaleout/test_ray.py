"""Scale-out on a local Ray cluster (``ray.init(num_cpus=2)``): Ray Data scoring, Ray Serve.

One cluster for the whole module; actors ask for fractions of a CPU so that a pool and a
Serve deployment fit on a 2-core machine. Select with ``-m ray``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossrank import EngineOptions, Reranker
from tests.conftest import DOCS, QUERY

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def ordered() -> Iterator[None]:
    """Ray Data keeps block order only when asked to (a process-wide setting)."""
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = before


def _pairs(n: int) -> list[dict]:
    docs = ["Mars is red.", "", "火星是红色的。", "Le ciel est bleu. " * 7, "read_csv skiprows"]
    return [
        {
            "id": i,
            "question": ["which planet is red", "什么是熊猫", "quelle couleur"][i % 3],
            "passage": docs[i % len(docs)] + f" #{i}" * (i % 5),
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------- Ray Data
def test_score_dataset_scores_every_row_once_like_score_pairs(
    cluster: None, ordered: None, tiny_model_dir: Path, tiny_reranker: Reranker
) -> None:
    from crossrank.ray import score_dataset

    rows = _pairs(3000)
    ds = ray.data.from_items(rows, override_num_blocks=12)
    scored = score_dataset(
        ds,
        query_col="question",
        doc_col="passage",
        out_col="relevance",
        model=str(tiny_model_dir),
        concurrency=2,
        num_cpus=0.5,
        batch_size=200,
        device="cpu",
    ).take_all()
    assert [r["id"] for r in scored] == list(range(len(rows)))  # none lost, duplicated, moved
    assert [{k: r[k] for k in ("id", "question", "passage")} for r in scored] == rows
    expected = tiny_reranker.score_pairs([(r["question"], r["passage"]) for r in rows])
    np.testing.assert_allclose([r["relevance"] for r in scored], expected, rtol=0, atol=1e-5)


def test_score_dataset_names_a_bad_row(cluster: None, tiny_model_dir: Path) -> None:
    from crossrank.ray import score_dataset

    rows = [{"id": i, "query": "q", "document": f"d{i}"} for i in range(40)]
    rows[23]["document"] = None
    ds = score_dataset(
        ray.data.from_items(rows), model=str(tiny_model_dir), num_cpus=0.5, device="cpu"
    )
    with pytest.raises(ray.exceptions.RayError) as err:
        ds.materialize()
    assert "row {'id': 23, 'query': 'q', 'document': None}: document must be a str" in str(
        err.value
    )


def test_score_dataset_checks_its_arguments(cluster: None) -> None:
    from crossrank.ray import score_dataset

    ds = ray.data.from_items([{"query": "q", "document": "d"}])
    for kwargs, message in (
        ({"concurrency": 0}, "concurrency must be"),
        ({"concurrency": (3, 1)}, "concurrency must be"),
        ({"batch_size": 0}, "batch_size must be"),
    ):
        with pytest.raises(ValueError, match=message):
            score_dataset(ds, **kwargs)


def test_score_file_on_ray_writes_what_the_local_path_writes(
    cluster: None, ordered: None, tiny_model_dir: Path, tiny_reranker: Reranker, tmp_path: Path
) -> None:
    import typer
    from typer.testing import CliRunner

    from crossrank.cli.score_file import score_file
    from crossrank.score_file import score_local_file

    app = typer.Typer()
    app.command("score-file")(score_file)
    app.callback()(lambda: None)
    rows = [{"id": r["id"], "query": r["question"], "document": r["passage"]} for r in _pairs(300)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    result = CliRunner().invoke(
        app,
        [
            "score-file",
            str(source),
            str(tmp_path / "ray.jsonl"),
            "-m",
            str(tiny_model_dir),
            "--ray",
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    score_local_file(tiny_reranker, source, tmp_path / "local.jsonl", progress=False)
    on_ray = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text("utf-8").splitlines()]
    local = [
        json.loads(line) for line in (tmp_path / "local.jsonl").read_text("utf-8").splitlines()
    ]
    assert [{k: r[k] for k in ("id", "query", "document")} for r in on_ray] == rows
    np.testing.assert_allclose(
        [r["score"] for r in on_ray], [r["score"] for r in local], rtol=0, atol=1e-5
    )


# -------------------------------------------------------------------------- Ray Serve
MAX_DOCS = 20
KEY = "sk-ray-test"
SERVED_NAMES = ["reranker-test", "reranker-alias"]

#: (method, path, JSON body): Cohere, Jina and TEI shapes, options, and each kind of error.
REQUESTS: list[tuple[str, str, object]] = [
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/rerank", {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS}),
    (
        "POST",
        "/v2/rerank",
        {
            "query": QUERY,
            "documents": [{"text": d} for d in DOCS],
            "top_n": 3,
            "return_documents": True,
            "return_raw_scores": True,
            "max_tokens_per_doc": 6,
        },
    ),
    ("POST", "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}),
    ("POST", "/rerank", {"query": QUERY, "texts": DOCS}),
    ("POST", "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}),
    ("POST", "/rerank", {"query": QUERY, "texts": ["a", "planet " * 600], "truncate": False}),
    ("POST", "/v2/rerank", {"query": " ", "documents": DOCS}),
    ("POST", "/v2/rerank", {"query": QUERY, "documents": ["d"] * (MAX_DOCS + 1)}),
    ("POST", "/v2/rerank", {"query": QUERY, "documents": ["a", 3]}),
    ("POST", "/v1/rerank", {"query": QUERY}),
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def proxy_url(cluster: None) -> Iterator[str]:
    """Ray Serve started, with its HTTP proxy on a free port."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def serve_url(proxy_url: str, tiny_model_dir: Path) -> str:
    """The rerank app on Ray Serve: two replicas of half a CPU each, behind Serve's proxy."""
    from ray import serve

    from crossrank.ray import RerankAppArgs, build_app

    args = RerankAppArgs(
        model=str(tiny_model_dir),
        replicas=2,
        num_cpus=0.5,
        device="cpu",
        max_docs=MAX_DOCS,
        api_key=KEY,
        served_model_name=SERVED_NAMES,
    )
    serve.run(build_app(args), name="crossrank-test", route_prefix="/")
    return proxy_url


@pytest.fixture(scope="module")
def single_process_url(tiny_model_dir: Path) -> Iterator[str]:
    """``crossrank serve``'s app in this process, with the same settings."""
    from crossrank.server import ServerSettings, create_app
    from crossrank.server.runner import BackgroundServer

    reranker = Reranker(str(tiny_model_dir), device="cpu")
    settings = ServerSettings(max_docs=MAX_DOCS, api_key=KEY, served_model_name=SERVED_NAMES)
    app = create_app(reranker, settings)
    with BackgroundServer(app) as server:
        server.wait_ready()
        yield server.url
    reranker.close()


def _comparable(body: object) -> object:
    """A response body with its random request id dropped and floats rounded to 1e-5."""
    if isinstance(body, dict):
        return {k: _comparable(v) for k, v in body.items() if k != "id"}
    if isinstance(body, list):
        return [_comparable(v) for v in body]
    if isinstance(body, float):
        return round(body, 5)
    return body


def test_serve_answers_exactly_like_the_single_process_server(
    serve_url: str, single_process_url: str
) -> None:
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, body in REQUESTS:
        answers = [
            httpx.request(method, url + path, json=body, headers=auth, timeout=60)
            for url in (single_process_url, serve_url)
        ]
        single, on_ray = answers
        assert on_ray.status_code == single.status_code, (path, body, on_ray.text)
        assert _comparable(on_ray.json()) == _comparable(single.json()), (path, body)
        if path == "/v1/models":  # the served names reached the replicas
            assert [model["id"] for model in on_ray.json()["data"]] == SERVED_NAMES
    # the API key guards the Serve app too
    denied = httpx.post(serve_url + "/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert denied.status_code == 401


def test_concurrent_handle_calls_each_get_their_own_ranking(
    serve_url: str, tiny_reranker: Reranker
) -> None:
    import asyncio

    from ray import serve

    handle = serve.get_app_handle("crossrank-test")
    calls = [(f"{QUERY} {i}", DOCS[: 1 + i % len(DOCS)], 1 + i % 3) for i in range(24)]

    async def call_all() -> list:
        return await asyncio.gather(*(handle.rerank.remote(q, d, n) for q, d, n in calls))

    answers = asyncio.run(call_all())
    for (query, docs, top_n), got in zip(calls, answers, strict=True):
        want = tiny_reranker.rerank(query, docs, top_n=top_n)
        assert [r.index for r in got] == [r.index for r in want]
        assert [r.document for r in got] == [r.document for r in want]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-5)
    with pytest.raises(ValueError, match="query must not be empty"):
        handle.rerank.remote(" ", DOCS).result(timeout_s=60)
    with pytest.raises(ValueError, match="decoder"):  # an encoder takes no instruction
        handle.rerank.remote(QUERY, DOCS, instruction="Judge relevance").result(timeout_s=60)


@pytest.fixture(scope="module")
def llm_app(proxy_url: str, tiny_qwen3_dir: Path) -> Iterator[str]:
    """A tiny Qwen3-Reranker on Ray Serve: one replica of half a CPU."""
    from ray import serve

    from crossrank.ray import RerankAppArgs, build_app

    args = RerankAppArgs(model=str(tiny_qwen3_dir), replicas=1, num_cpus=0.5, device="cpu")
    serve.run(build_app(args), name="crossrank-llm", route_prefix="/llm")
    try:
        yield "crossrank-llm"
    finally:
        serve.delete("crossrank-llm")


def test_handle_calls_each_take_their_own_instruction(llm_app: str, qwen3: Reranker) -> None:
    import asyncio

    from ray import serve

    from tests.backends.llm_assets import OTHER_INSTRUCTION

    handle = serve.get_app_handle(llm_app)
    instructions = [None, OTHER_INSTRUCTION, "Judge relevance to a legal question", None] * 3
    calls = [(f"{QUERY} {i}", DOCS[: 2 + i % 3], ins) for i, ins in enumerate(instructions)]

    async def call_all() -> list:  # concurrent: @serve.batch merges calls of several
        return await asyncio.gather(
            *(handle.rerank.remote(q, d, instruction=ins) for q, d, ins in calls)
        )

    answers = asyncio.run(call_all())
    for (query, docs, instruction), got in zip(calls, answers, strict=True):
        want = qwen3.rerank(query, docs, instruction=instruction)
        assert [r.index for r in got] == [r.index for r in want]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-5)
    # the instruction changes the scores (or the test above could not fail)
    plain = qwen3.score(QUERY, DOCS)
    assert not np.allclose(plain, qwen3.score(QUERY, DOCS, instruction=OTHER_INSTRUCTION))
    with pytest.raises(TypeError, match="instruction must be a str"):
        handle.rerank.remote(QUERY, DOCS, instruction=3).result(timeout_s=60)


def test_a_killed_replica_loses_no_retried_request(serve_url: str, tiny_reranker: Reranker) -> None:
    """Serve replaces the killed replica; the requests it held fail with a 5xx and succeed
    when the client retries (rerank is idempotent), so every request is answered, correctly."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    docs = [f"document {i} " * 60 for i in range(MAX_DOCS)]
    want = tiny_reranker.score(QUERY, docs)
    retried: list[int] = []
    done = threading.Semaphore(0)

    def replicas() -> list[str]:
        names = (a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
        return sorted(n for n in names if n.startswith("SERVE_REPLICA::crossrank-test#"))

    def rerank(i: int) -> dict:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.post(
                    serve_url + "/v1/rerank",
                    json={"query": QUERY, "documents": docs},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=60,
                )
                if r.status_code < 500:
                    done.release()
                    return {"status": r.status_code, "body": r.json()}
            except httpx.TransportError:
                pass
            retried.append(i)
            assert time.monotonic() < deadline, "a request was never answered"
            time.sleep(0.2)

    before = replicas()
    assert len(before) == 2
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(rerank, i) for i in range(36)]
        for _ in range(8):  # mid-run: after some answers, with six requests in flight
            done.acquire(timeout=120)
        victim = _busy_replica(before)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answers = [f.result() for f in futures]
    assert retried, "no request failed with the killed replica, so none was retried"
    for answer in answers:
        assert answer["status"] == 200
        scores = {x["index"]: x["relevance_score"] for x in answer["body"]["results"]}
        assert sorted(scores) == list(range(len(docs)))
        np.testing.assert_allclose([scores[i] for i in range(len(docs))], want, atol=1e-5)
    deadline = time.monotonic() + 120
    while not (len(now := replicas()) == 2 and victim not in now):
        assert time.monotonic() < deadline, f"Serve did not replace the replica: {now}"
        time.sleep(0.5)


def test_a_stopping_app_answers_503_then_is_deleted(proxy_url: str, tiny_model_dir: Path) -> None:
    """``stop_app`` (what ``crossrank serve --ray`` does on SIGTERM) first makes every replica
    answer 503 with a JSON error and Retry-After (Serve's proxy answered 404 once the app
    was deleted at once), then deletes the app; a later request is answered, not held."""
    import threading

    import httpx
    from ray import serve

    from crossrank.ray import RerankAppArgs, build_app
    from crossrank.ray.serve import stop_app

    args = RerankAppArgs(model=str(tiny_model_dir), num_cpus=0.5, device="cpu", api_key=None)
    serve.run(build_app(args), name="crossrank-drain", route_prefix="/drain")
    url, body = proxy_url + "/drain/v1/rerank", {"query": QUERY, "documents": DOCS}
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    cut_short = threading.Event()
    stopper = threading.Thread(
        target=stop_app, args=(300,), kwargs={"name": "crossrank-drain", "cut_short": cut_short}
    )
    stopper.start()
    try:
        while (answer := httpx.post(url, json=body, timeout=60)).status_code == 200:
            pass  # until the broadcast reached the replica
        ready = httpx.get(proxy_url + "/drain/ready", timeout=60)
        assert stopper.is_alive()  # still in the drain period
    finally:
        cut_short.set()
        stopper.join(120)
    assert answer.status_code == 503, answer.text
    assert "shutting down" in answer.json()["message"] and answer.headers["Retry-After"] == "1"
    assert ready.status_code == 503 and "shutting down" in ready.json()["message"]
    assert not stopper.is_alive()
    assert "crossrank-drain" not in serve.status().applications
    after = httpx.post(url, json=body, timeout=60)  # answered by the proxy, not held
    assert after.status_code == 404, after.text


def _busy_replica(names: list[str]) -> str:
    """A replica that is working on a request right now (so killing it cuts requests off)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in names:
            actor = ray.get_actor(name, namespace="serve")
            if ray.get(actor.get_num_ongoing_requests.remote(), timeout=10) > 0:
                return name
    raise TimeoutError("no replica was busy")


# ----------------------------------------------------------------- crossrank serve --ray
@pytest.fixture
def serve_ray(monkeypatch: pytest.MonkeyPatch) -> tuple[Callable[..., Any], list[tuple]]:
    """``invoke(*args, env=...)`` runs ``crossrank serve -m some/model *args``; ``run_app``
    records the :class:`RerankAppArgs` it would deploy in ``calls`` instead."""
    import typer
    from typer.testing import CliRunner

    import crossrank.ray
    from crossrank.cli.serve import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.callback()(lambda: None)
    calls: list[tuple] = []
    monkeypatch.setattr(crossrank.ray, "run_app", lambda args, **kw: calls.append((args, kw)))
    monkeypatch.delenv("CROSSRANK_API_KEY", raising=False)

    def invoke(*args: str, env: dict[str, str] | None = None):
        return CliRunner().invoke(app, ["serve", "-m", "some/model", *args], env=env)

    return invoke, calls


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """What :func:`build_app` binds every replica with (no cluster: the deployment is faked)."""
    import crossrank.ray.serve

    calls: list[tuple[tuple, dict]] = []

    class Deployment:
        def options(self, **kw: object) -> Deployment:
            return self

        def bind(self, *a: object, **kw: object) -> None:
            calls.append((a, kw))

    monkeypatch.setattr(crossrank.ray.serve, "RerankDeployment", Deployment())
    return calls


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_serve_ray_flags_become_app_args(
    serve_ray: tuple[Callable[..., Any], list[tuple]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options map onto :class:`RerankAppArgs` (what ``run_app`` deploys: the Serve app
    itself is tested above through ``build_app``)."""
    invoke, calls = serve_ray
    result = invoke("--ray", "--autoscale", "2:8", "--port", "9001", "--max-docs", "30")
    assert result.exit_code == 0, result.output
    args, kw = calls.pop()
    assert kw == {"host": "127.0.0.1", "port": 9001}
    assert (args.model, args.autoscale, args.replicas, args.max_docs) == (
        "some/model",
        (2, 8),
        None,
        30,
    )
    assert args.api_key is None

    result = invoke("--ray", "--replicas", "3", "--api-key", "sk-secret-1", "--device", "cuda")
    assert result.exit_code == 0, result.output
    args, _ = calls.pop()
    assert (args.replicas, args.autoscale, args.device) == (3, None, "cuda")
    assert args.api_key.get_secret_value() == "sk-secret-1" and "sk-secret" not in repr(args)

    result = invoke(
        *("--ray", "--long-docs", "chunk", "--chunk-tokens", "100", "--chunk-overlap", "8"),
        *("--aggregate", "mean", "--query-max-length", "64", "--backend", "onnx", "--quantize"),
        *("--max-batch-tokens", "2048"),
        env={"CROSSRANK_CACHE": "redis://:pw@cache:6379/0"},
    )
    assert result.exit_code == 0, result.output
    args, _ = calls.pop()
    assert args.engine_options() == EngineOptions(
        query_max_length=64,
        batch_tokens=2048,
        long_docs="chunk",
        chunk_tokens=100,
        chunk_overlap=8,
        aggregate="mean",
        cache="redis://:pw@cache:6379/0",
        backend="onnx",
        quantize=True,
    )

    from crossrank.ray import RerankAppArgs

    monkeypatch.setenv("CROSSRANK_API_KEY", "sk-from-env")  # where a config file's app is built
    assert RerankAppArgs.model_validate({}).api_key.get_secret_value() == "sk-from-env"

    for bad, message in (
        (["--replicas", "2"], "need --ray"),
        (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
        (["--ray", "--autoscale", "3:1"], "MIN <= MAX"),
        (["--ray", "--autoscale", "4"], "MIN:MAX"),
    ):
        result = invoke(*bad)
        assert result.exit_code == 2 and message in _flat(result.output), bad
    assert not calls


def test_app_args_take_the_engine_options_and_check_them(
    bound: list[tuple[tuple, dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RerankAppArgs`` (a config file's ``args``, or ``serve --ray``) accepts the engine's
    options, refuses bad ones with the engine's message, and ``build_app`` hands them to every
    replica's ``Reranker``; no cluster is needed for either."""
    from pydantic import ValidationError

    from crossrank.ray import RerankAppArgs, build_app

    monkeypatch.delenv("CROSSRANK_CACHE", raising=False)
    # as a config file or `serve run ... key=value` gives them: strings
    args = RerankAppArgs.model_validate(
        {
            "long_docs": "chunk",
            "chunk_tokens": "128",
            "chunk_overlap": "16",
            "aggregate": "first",
            "query_max_length": "32",
            "cache": "redis://:pw-in-url@cache.internal:6379/1",
            "backend": "onnx",
            "quantize": "true",
            "num_gpus": 0,
        }
    )
    assert "pw-in-url" not in repr(args) and "pw-in-url" not in args.model_dump_json()

    build_app(args)
    [((_, _, options), _)] = bound
    assert options == EngineOptions(
        query_max_length=32,
        long_docs="chunk",
        chunk_tokens=128,
        chunk_overlap=16,
        aggregate="first",
        cache="redis://:pw-in-url@cache.internal:6379/1",
        backend="onnx",
        quantize=True,
    )
    # the token budget keeps its documented config key
    budget = RerankAppArgs.model_validate({"max_batch_tokens": "2048"})
    assert budget.engine_options().batch_tokens == 2048

    monkeypatch.setenv("CROSSRANK_CACHE", "memory")  # read where the app is built
    defaults = RerankAppArgs.model_validate({})
    assert defaults.engine_options().cache == "memory"
    assert (defaults.long_docs, defaults.backend, defaults.quantize) == ("truncate", "torch", False)

    for bad, message in (
        ({"long_docs": "paragraph"}, "long_docs"),
        ({"aggregate": "median"}, "aggregate"),
        ({"backend": "tensorrt"}, "backend"),
        ({"quantize": True}, "quantize=True needs backend='onnx'"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive int"),
        ({"chunk_overlap": -1}, "chunk_overlap must be an int >= 0"),
        ({"query_max_length": 0}, "query_max_length must be a positive int"),
        ({"max_length": 4}, "max_length must be an int >= 8"),
        ({"cache": "redis:/u:pw-in-url@host"}, "cache must be None, 'memory'"),
    ):
        with pytest.raises(ValidationError) as err:
            RerankAppArgs.model_validate(bad)
        assert message in str(err.value) and "pw-in-url" not in str(err.value), bad


#: The settings Ray's HTTP proxy would have to apply (it holds the client connections).
CONNECTION_SETTINGS = {
    "timeout_header",
    "timeout_keep_alive",
    "limit_concurrency",
    "max_header_bytes",
}


def test_every_server_flag_reaches_the_replicas_or_is_refused_naming_it(
    serve_ray: tuple[Callable[..., Any], list[tuple]],
) -> None:
    """``serve --ray`` drops no server flag: each one given alone either arrives in the
    settings every replica gets, or (a connection setting) is a usage error naming it."""
    from crossrank.options import option_fields
    from crossrank.server import ServerSettings
    from tests.server.helpers import other_setting_value

    invoke, calls = serve_ray
    reached: dict[str, tuple[str, object]] = {}
    for field in option_fields(ServerSettings):
        written, parsed = other_setting_value(field.default)
        result = invoke("--ray", field.flag, written)
        if field.name in CONNECTION_SETTINGS:
            output = _flat(result.output)
            assert result.exit_code == 2, (field.flag, output)
            assert f"Invalid value for '{field.flag}'" in output, output
            assert "cannot apply on Ray Serve" in output, output
            continue
        assert result.exit_code == 0, (field.flag, result.output)
        args, _ = calls.pop()
        assert getattr(args.server_settings(), field.name) == parsed, field.flag
        reached[field.name] = (field.flag, written)
    assert set(reached) == {
        "api_key",
        "max_docs",
        "max_queue",
        "request_timeout",
        "served_model_name",
        "timeout_body",
    }
    result = invoke("--ray", *(part for pair in reached.values() for part in pair))
    assert result.exit_code == 0, result.output
    (args, _), *others = calls
    assert not others
    settings = args.server_settings()
    assert settings == ServerSettings(
        api_key="sk-test-key",
        max_docs=1001,
        max_queue=10_001,
        request_timeout=121.0,
        served_model_name=("alias",),
        timeout_body=61.0,
    )
    assert "sk-test-key" not in repr(args)


def test_a_setting_that_cannot_reach_the_replicas_is_refused_not_dropped() -> None:
    """Every ``ServerSettings`` field changed from its default either arrives in the
    replicas' settings or is refused with an ``OptionError`` naming it: the connection
    settings, and those without a config key (set only in code)."""
    import dataclasses

    from crossrank.errors import OptionError
    from crossrank.ray import RerankAppArgs
    from crossrank.server import ServerSettings
    from tests.server.helpers import other_setting_value

    refused = set()
    for spec in dataclasses.fields(ServerSettings):
        _, value = other_setting_value(spec.default)
        settings = ServerSettings(**{spec.name: value})
        try:
            args = RerankAppArgs.from_options(settings, EngineOptions())
        except OptionError as err:
            assert err.param == spec.name
            refused.add(spec.name)
        else:
            assert args.server_settings() == settings, spec.name
    assert refused == CONNECTION_SETTINGS | {"max_body_bytes", "retry_after"}
    with pytest.raises(OptionError) as err:  # an engine option without a config key
        RerankAppArgs.from_options(ServerSettings(), EngineOptions(overlap_min_pairs=5))
    assert err.value.param == "overlap_min_pairs"


def test_a_replica_refuses_connection_settings_it_cannot_apply() -> None:
    """Bound by hand (``RerankDeployment.bind(model, settings)``), the deployment refuses a
    connection setting too, before loading anything."""
    from crossrank.errors import OptionError
    from crossrank.ray import RerankDeployment
    from crossrank.server import ServerSettings

    # the class under Serve's ingress wrapper (whose constructor is a coroutine for Serve)
    replica = RerankDeployment.func_or_class.__mro__[1]
    assert replica.__qualname__ == "RerankDeployment"
    with pytest.raises(OptionError, match="timeout_keep_alive cannot apply on Ray Serve"):
        replica("no/such-model", ServerSettings(timeout_keep_alive=30))


def _documented_serve_config() -> dict:
    """The Serve config file of docs/scale-out.md, as ``serve deploy`` reads it."""
    import re
    import textwrap

    yaml = pytest.importorskip("yaml")
    text = (Path(__file__).parents[2] / "docs" / "scale-out.md").read_text("utf-8")
    [block] = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    return yaml.safe_load(textwrap.dedent(block))


def test_a_serve_config_sets_the_server_settings_and_a_bad_one_is_named(
    bound: list[tuple[tuple, dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from crossrank.ray import build_app
    from crossrank.server import ServerSettings

    monkeypatch.delenv("CROSSRANK_API_KEY", raising=False)
    monkeypatch.delenv("CROSSRANK_CACHE", raising=False)
    [application] = _documented_serve_config()["applications"]
    assert application["import_path"] == "crossrank.ray:build_app"
    # no GPUs asked for (else build_app asks a Ray cluster whether it has any)
    args = {**application["args"], "num_gpus": 0, "timeout_body": 20}
    build_app(args)
    [((model, settings, options), _)] = bound
    assert model == "/models/bge-reranker-v2-m3" and options == EngineOptions(long_docs="chunk")
    assert settings == ServerSettings(
        served_model_name=("bge-reranker-v2-m3",),
        max_docs=1000,
        max_queue=10_000,
        request_timeout=60,
        timeout_body=20,
    )
    for bad, message in (
        ({"max_docs": 0}, "max_docs must be a positive int, got 0"),
        ({"max_docs": True}, "max_docs must not be true or false"),
        ({"max_docs": 50, "max_queue": 49}, "max_queue=49 must be >= max_docs=50"),
        ({"request_timeout": 0}, "request_timeout must be > 0 seconds"),
        ({"timeout_body": "soon"}, "timeout_body\n  Input should be a valid number"),
        ({"served_model_name": ["ok", " "]}, "served_model_name must be non-blank strings"),
        ({"api_key": " "}, "api_key must not be empty"),
        ({"timeout_keep_alive": 30}, "timeout_keep_alive cannot apply on Ray Serve"),
        ({"max_header_bytes": 4096}, "max_header_bytes cannot apply on Ray Serve"),
        ({"max_body_bytes": 1024}, "max_body_bytes\n  Extra inputs are not permitted"),
    ):
        with pytest.raises(ValidationError) as err:
            build_app({**args, **bad, "api_key": bad.get("api_key", "sk-live-secret")})
        assert message in str(err.value) and "sk-live-secret" not in str(err.value), bad
    monkeypatch.setenv("CROSSRANK_API_KEY", "")  # set but empty where the app is built
    with pytest.raises(ValidationError, match="api_key must not be empty"):
        build_app(args)
    assert len(bound) == 1
