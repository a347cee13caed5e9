"""Each front door, given a Hub id it cannot get, fails at once with one message whose remedy
is its own (``--model PATH``, ``Reranker("/path/to/model")``, ``--rerank-model PATH``,
``CROSSRANK_EMBED_MODEL=/path/to/model``) and the exit status it documents.

Two kinds of "cannot get" (both for the CLI, one each for the slower front doors): ``HF_HUB_OFFLINE=1`` (the remedy names that switch) and a Hub that
does not answer (``HF_ENDPOINT`` points at a closed local port: the probe fails at once). The
commands run in subprocesses, as a user runs them; the only time bound is a generous
``timeout`` so a retry loop would fail the test rather than hang it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import crossrank
from crossrank import Reranker
from crossrank.errors import ModelLoadError
from crossrank.loading import PYTHON_HINT

SOURCE = str(Path(crossrank.__file__).resolve().parents[1])
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HUB_ID = "BAAI/bge-reranker-v2-m3"
CLI = [sys.executable, "-c", "from crossrank.cli import app; app()"]
#: The subprocess tests start a fresh Python with torch each (seconds on a quiet machine).
pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _no_hub(case: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a machine where the Hub cannot be used: ``offline`` (HF_HUB_OFFLINE=1)
    or ``unreachable`` (the Hub endpoint is a closed local port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CROSSRANK_"))}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": SOURCE, "COLUMNS": "200"}
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    return env


@pytest.fixture(params=["offline", "unreachable"])
def no_hub(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    return _no_hub(request.param, tmp_path)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=280
    )  # a bound on returning at all


def _assert_one_message(output: str, env: dict[str, str], remedy: str) -> None:
    assert output.count(f"could not load '{HUB_ID}'") == 1, output
    assert remedy in output, output
    if "HF_HUB_OFFLINE" in env:
        assert "Drop HF_HUB_OFFLINE=1 to download it" in output, output
    else:
        assert "the Hugging Face Hub cannot be reached" in output, output
    assert "Traceback" not in output and "Retrying" not in output, output


def test_cli_rerank(no_hub: dict[str, str]) -> None:
    result = _run([*CLI, "rerank", "--model", HUB_ID, "q", "a document"], no_hub)
    assert result.returncode == 1
    _assert_one_message(result.stderr, no_hub, "--model PATH")
    assert "Reranker(" not in result.stderr


def test_server(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    no_hub = _no_hub("offline", tmp_path)
    port = str(_closed_port())
    result = _run([*CLI, "serve", "--model", HUB_ID, "--port", port], no_hub)
    assert result.returncode == 1
    _assert_one_message(result.stderr, no_hub, "--model PATH")


def test_demo(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    no_hub = _no_hub("unreachable", tmp_path)
    result = _run([*CLI, "demo", "--embed-model", "BAAI/bge-m3", "--rerank-model", HUB_ID], no_hub)
    assert result.returncode == 3  # EXIT_MODEL_UNAVAILABLE: scripts/demo.sh falls back
    _assert_one_message(result.stderr, no_hub, "--rerank-model PATH (or CROSSRANK_RERANK_MODEL")
    assert "--embed-model PATH (or CROSSRANK_EMBED_MODEL" in result.stderr


@pytest.mark.parametrize(
    ("script", "case"), [("rag_langchain.py", "unreachable"), ("rag_llamaindex.py", "offline")]
)
def test_examples(script: str, case: str, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    no_hub = _no_hub(case, tmp_path)
    result = _run([sys.executable, str(EXAMPLES / script)], no_hub)
    assert result.returncode == 1
    _assert_one_message(result.stderr, no_hub, "CROSSRANK_RERANK_MODEL=/path/to/model")
    assert "CROSSRANK_EMBED_MODEL=/path/to/model" in result.stderr


def test_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("crossrank.loading._local_model_hint", PYTHON_HINT)  # no command's
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as offline:
        Reranker(HUB_ID)
    assert "HF_HUB_OFFLINE=1 turns downloads off" in str(offline.value)
    assert 'Reranker("/path/to/model")' in str(offline.value)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("crossrank.loading.hub_reachable", lambda: False)
    with pytest.raises(ModelLoadError, match="Hub cannot be reached") as unreachable:
        Reranker(HUB_ID)
    assert 'Reranker("/path/to/model")' in str(unreachable.value)
    with pytest.raises(ModelLoadError, match="local_files_only=True turns downloads off"):
        Reranker(HUB_ID, local_files_only=True)
