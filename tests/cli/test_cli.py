"""The ``crossrank rerank`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from crossrank import Reranker
from crossrank.cli import app

runner = CliRunner()


def test_rerank_json_matches_the_engine(tiny_model_dir: Path, tiny_reranker: Reranker) -> None:
    docs = ["Mars is red", "Grass is green", "火星是红色的"]
    result = runner.invoke(
        app, ["rerank", "--model", str(tiny_model_dir), "--json", "which planet is red", *docs]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    scores = tiny_reranker.score("which planet is red", docs)
    assert [p["index"] for p in payload] == list(np.argsort(-scores, kind="stable"))
    assert [p["document"] for p in payload] == [docs[p["index"]] for p in payload]


def test_rerank_table_from_docs_file_and_stdin(tiny_model_dir: Path, tmp_path: Path) -> None:
    docs_file = tmp_path / "docs.txt"
    docs_file.write_text("first document\nsecond document\nthird document\n", encoding="utf-8")
    result = runner.invoke(
        app, ["rerank", "-m", str(tiny_model_dir), "-f", str(docs_file), "-n", "2", "my query"]
    )
    assert result.exit_code == 0, result.output
    assert "2 of 3 documents" in result.stdout and "rank" in result.stdout
    piped = runner.invoke(
        app, ["rerank", "-m", str(tiny_model_dir), "-f", "-", "--json", "q"], input="a\nb\n"
    )
    assert piped.exit_code == 0, piped.output
    assert sorted(p["document"] for p in json.loads(piped.stdout.strip().splitlines()[-1])) == [
        "a",
        "b",
    ]


def test_rerank_errors_are_clear(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["rerank", "-m", str(tmp_path / "nope"), "q", "d"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    no_docs = runner.invoke(app, ["rerank", "-m", str(tmp_path), "q"])
    assert no_docs.exit_code != 0 and "no documents" in no_docs.output
