"""The LLM step through the openai SDK against a fake OpenAI-compatible endpoint (a tiny
local HTTP server): request shape, key handling, retries, errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from crossrank.errors import LLMError
from crossrank.rag.llm import LLMConfig, chat

ANSWER = "Mars is red [p001]."


class FakeEndpoint(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions; the first ``failures`` requests get ``status``."""

    seen: list[tuple[str, dict[str, str], dict[str, object]]] = []  # noqa: RUF012
    failures = 0
    status = 503

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeEndpoint.seen.append((self.path, dict(self.headers), body))
        if len(FakeEndpoint.seen) <= FakeEndpoint.failures:
            self._send(FakeEndpoint.status, {"error": "upstream exploded"})
            return
        message = {"role": "assistant", "content": ANSWER}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        completion = {"id": "c", "object": "chat.completion", "created": 0, "model": "m"}
        self._send(200, {**completion, "choices": [choice]})

    def _send(self, status: int, payload: dict[str, object]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("retry-after-ms", "1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    FakeEndpoint.seen, FakeEndpoint.failures = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_request_shape_and_key(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "must-not-be-used")
    messages = [{"role": "user", "content": "q"}]
    assert chat(messages, LLMConfig(base_url, "m", "sk-test"), max_tokens=7) == ANSWER
    path, headers, body = FakeEndpoint.seen[-1]
    assert path == "/v1/chat/completions"
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer sk-test"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("m", 0, 7)
    assert body["messages"] == messages
    assert chat(messages, LLMConfig(base_url, "m")) == ANSWER
    _, headers, _ = FakeEndpoint.seen[-1]
    assert "authorization" not in {k.lower() for k in headers}  # no key: no header


def test_transient_errors_are_retried(base_url: str) -> None:
    FakeEndpoint.failures, FakeEndpoint.status = 2, 503
    config = LLMConfig(base_url, "m", "sk-test", max_retries=2)
    assert chat([{"role": "user", "content": "p"}], config) == ANSWER
    assert len(FakeEndpoint.seen) == 3


def test_errors_name_the_endpoint_never_the_key(base_url: str) -> None:
    FakeEndpoint.failures, FakeEndpoint.status = 10, 500
    config = LLMConfig(base_url, "m", "sk-secret", max_retries=1)
    with pytest.raises(LLMError, match=r"answered HTTP 500: .*upstream exploded") as err:
        chat([{"role": "user", "content": "p"}], config)
    assert "sk-secret" not in str(err.value) and len(FakeEndpoint.seen) == 2
    down = LLMConfig("http://127.0.0.1:9/v1", "m", "sk-secret", timeout=5, max_retries=0)
    with pytest.raises(LLMError, match="could not reach the LLM endpoint") as err:
        chat([{"role": "user", "content": "p"}], down)
    assert "sk-secret" not in str(err.value)
