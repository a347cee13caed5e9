"""``crossrank serve`` as a real process: API key from the environment (never logged),
graceful shutdown on SIGTERM (in-flight requests finish), exit codes for bad options and for
a model that cannot load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import typer
from typer.testing import CliRunner

from crossrank.cli.serve import serve
from tests.server.helpers import metric, wait_until

pytestmark = pytest.mark.timeout(300)

# crossrank.cli registers the same function with app.command("serve")(serve.serve).
SERVE = "import typer; from crossrank.cli.serve import serve; typer.run(serve)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_lets_in_flight_requests_finish(tiny_model_dir):
    key = "sk-" + uuid.uuid4().hex
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch-tokens",
        "512",
        env={"CROSSRANK_API_KEY": key},
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(url + "/ready").status_code == 200
            except httpx.ConnectError:
                return False

        wait_until(ready, timeout=180, what="the server to be ready")
        auth = {"Authorization": f"Bearer {key}"}
        assert (
            httpx.post(url + "/v2/rerank", json={"query": "q", "documents": ["d"]}).status_code
            == 401
        )
        docs = [f"document {i} about the red planet and its iron oxide dust" for i in range(400)]
        finished: list[tuple[int, int, float]] = []

        def client() -> None:
            r = httpx.post(
                url + "/v2/rerank",
                json={"query": "red planet", "documents": docs},
                headers=auth,
                timeout=240,
            )
            finished.append((r.status_code, len(r.json().get("results", [])), time.monotonic()))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()

        def all_in_flight() -> bool:  # the three requests (and this scrape), work queued
            text = httpx.get(url + "/metrics").text
            return (
                metric(text, "crossrank_http_requests_in_flight") >= 4
                and metric(text, "crossrank_queue_depth_pairs") > 0
            )

        wait_until(all_in_flight, what="the three requests in flight, work queued")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(240)
        # uvicorn re-raises the signal once shut down, so the exit status is the signal's
        assert proc.wait(120) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read() if proc.stdout else ""
    assert [(status, n) for status, n, _ in finished] == [(200, len(docs))] * 3
    assert max(done for _, _, done in finished) > sent  # they really were in flight
    assert "Finished server process" in log
    assert key not in log


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(serve)
    return app


def test_model_that_cannot_load_exits_non_zero(tmp_path, caplog):
    result = CliRunner().invoke(
        cli(), ["--model", str(tmp_path / "missing"), "--port", str(free_port())]
    )
    assert result.exit_code == 1
    assert "does not exist" in caplog.text


def test_bad_limits_are_a_usage_error():
    result = CliRunner().invoke(cli(), ["--max-docs", "100", "--max-queue", "10"])
    assert result.exit_code == 2
    assert "max_queue=10 must be >= max_docs=100" in result.output
