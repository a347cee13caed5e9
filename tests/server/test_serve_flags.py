"""``crossrank serve``'s server flags reach ``ServerSettings``, and an empty API key from any
source stops the command with a usage error (issue 13, fault 4) before anything loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.server import runner


@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake_run_server(factory, settings, **kw):
        got["settings"] = settings
        return 0

    monkeypatch.setattr(runner, "run_server", fake_run_server)
    monkeypatch.delenv("CROSSRANK_API_KEY", raising=False)
    return got


@pytest.mark.parametrize(
    ("args", "env"),
    [([], {"CROSSRANK_API_KEY": ""}), ([], {"CROSSRANK_API_KEY": "  "}), (["--api-key", ""], {})],
)
def test_empty_api_key_is_a_usage_error(captured, args, env):
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 2, result.output
    assert "set but empty" in result.output
    assert "settings" not in captured


def test_connection_flags_and_served_names(captured):
    args = [
        "serve",
        "--served-model-name",
        "a",
        "--served-model-name",
        "b",
        "--timeout-header",
        "3",
        "--timeout-body",
        "7",
        "--timeout-keep-alive",
        "2",
        "--limit-concurrency",
        "9",
        "--max-header-bytes",
        "4096",
    ]
    result = CliRunner().invoke(app, args, env={"CROSSRANK_API_KEY": "k"})
    assert result.exit_code == 0, result.output
    settings = captured["settings"]
    assert settings.served_model_name == ("a", "b") and settings.api_key == "k"
    assert (settings.timeout_header, settings.timeout_body, settings.timeout_keep_alive) == (
        3,
        7,
        2,
    )
    assert (settings.limit_concurrency, settings.max_header_bytes) == (9, 4096)
