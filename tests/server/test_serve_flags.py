"""``crossrank serve``'s server flags (generated from ``ServerSettings``) reach the settings,
a bad value is a usage error naming its flag, and an empty API key from any source stops the
command with a usage error (issue 13, fault 4) before anything loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.options import option_fields
from crossrank.server import ServerSettings, runner
from tests.server.helpers import other_setting_value


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


def test_every_server_setting_with_a_flag_reaches_the_settings(captured):
    """The flags are generated from ``ServerSettings``: each field given on the command line
    arrives in the settings the server gets; fields without a flag keep their defaults."""
    args, expected = [], {}
    for field in option_fields(ServerSettings):
        written, parsed = other_setting_value(field.default)
        args += [field.flag, written]
        expected[field.name] = parsed
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    settings = captured["settings"]
    assert {name: getattr(settings, name) for name in expected} == expected
    flagless = set(ServerSettings.__dataclass_fields__) - set(expected)
    assert flagless == {"max_body_bytes", "retry_after"}
    assert all(getattr(settings, n) == getattr(ServerSettings(), n) for n in flagless)


@pytest.mark.parametrize(
    ("args", "flag", "message"),
    [
        (["--max-docs", "0"], "--max-docs", "max_docs must be a positive int"),
        (
            ["--max-header-bytes", "255"],
            "--max-header-bytes",
            "max_header_bytes must be an int >= 256",
        ),
        (["--timeout-body", "0"], "--timeout-body", "timeout_body must be > 0 seconds"),
        (["--max-docs", "50", "--max-queue", "49"], "--max-queue", "must be >= max_docs=50"),
        (["--served-model-name", " "], "--served-model-name", "non-blank strings"),
    ],
)
def test_a_bad_setting_is_a_usage_error_naming_its_flag_without_the_key(
    captured, args, flag, message
):
    result = CliRunner().invoke(app, ["serve", "--api-key", "sk-very-secret", *args])
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert f"Invalid value for '{flag}'" in output and message in output
    assert "sk-very-secret" not in output and "settings" not in captured
