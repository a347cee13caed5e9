"""``crossrank score-file`` on local files, without Ray: every row kept, in order, scored.

Most cases call :func:`score_local_file` with the session's tiny reranker (loading a model per
CLI call costs seconds); the CLI itself is run once end to end and for its argument checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from crossrank import Reranker
from crossrank.cli.score_file import score_file
from crossrank.score_file import score_local_file

runner = CliRunner()


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("score-file")(score_file)
    app.callback()(lambda: None)  # keep "score-file" a subcommand, as on the real CLI
    return app


def _rows(n: int) -> list[dict]:
    """Rows of varied lengths and scripts, with extra fields that must come back unchanged."""
    docs = ["Mars is red.", "", "火星是红色的。", "Le ciel est bleu. " * 9, "pandas read_csv"]
    return [
        {
            "id": i,
            "query": ["which planet is red", "什么是熊猫", "quelle couleur"][i % 3],
            "document": docs[i % len(docs)] + f" #{i}" * (i % 4),
            "meta": {"source": f"doc-{i}", "tags": ["a", "b"][: i % 3]},
        }
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _expected(reranker: Reranker, rows: list[dict], **kw: bool) -> np.ndarray:
    return reranker.score_pairs([(r["query"], r["document"]) for r in rows], **kw)


def test_jsonl_keeps_every_record_in_order_and_adds_its_score(
    cli: typer.Typer, tiny_model_dir: Path, tiny_reranker: Reranker, tmp_path: Path
) -> None:
    rows = _rows(53)
    _write_jsonl(tmp_path / "in.jsonl", rows, blank_after=20)
    args = ["score-file", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")]
    result = runner.invoke(cli, [*args, "-m", str(tiny_model_dir), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in out] == rows
    np.testing.assert_allclose(
        [r["score"] for r in out], _expected(tiny_reranker, rows), rtol=0, atol=1e-5
    )
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_parquet_keeps_every_row_in_order_and_raw_scores_are_logits(
    tiny_reranker: Reranker, tmp_path: Path
) -> None:
    rows = [{k: v for k, v in r.items() if k != "meta"} for r in _rows(45)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=10)
    for normalize in (True, False):
        score_local_file(
            tiny_reranker,
            tmp_path / "in.parquet",
            tmp_path / "out.parquet",
            batch_size=16,
            out_col="relevance",
            normalize=normalize,
            progress=False,
        )
        table = pq.read_table(tmp_path / "out.parquet")
        assert table.schema.field("relevance").type == pa.float32()
        assert table.drop_columns(["relevance"]).to_pylist() == rows
        np.testing.assert_allclose(
            table.column("relevance").to_numpy(),
            _expected(tiny_reranker, rows, normalize=normalize),
            rtol=0,
            atol=1e-5,
        )


def test_an_empty_parquet_file_gives_an_empty_scored_file(
    tiny_reranker: Reranker, tmp_path: Path
) -> None:
    schema = pa.schema([("query", pa.string()), ("document", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "in.parquet")
    score_local_file(tiny_reranker, tmp_path / "in.parquet", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0 and table.column_names == ["query", "document", "score"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            ['{"query": "q", "document": "d"}', '{"query": "q", "document": null}'],
            "line 2: document must be a str, got NoneType",
        ),
        (
            ['{"query": "q", "document": "d"}', '{"query": "  ", "document": "d"}'],
            "line 2: query must not be empty",
        ),
        (['{"query": "q", "document": 3}'], "line 1: document must be a str, got int"),
        (['{"query": "q", "text": "d"}'], "line 1: no document column 'document'"),
        (['{"query": "q", "document": "d", "score": 1}'], "already has a column 'score'"),
        (['{"query": "q", "document": "d"}', "{not json"], "line 2: not valid JSON"),
        (['["q", "d"]'], "line 1: expected a JSON object"),
    ],
)
def test_a_bad_record_is_named_and_leaves_no_output(
    tiny_reranker: Reranker, tmp_path: Path, lines: list[str], expected: str
) -> None:
    good = [json.dumps({"query": "q", "document": f"d{i}"}) for i in range(5)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines + good) + "\n", encoding="utf-8")
    (tmp_path / "out.jsonl").write_text("an earlier result\n", encoding="utf-8")
    with pytest.raises((TypeError, ValueError), match=re.escape(expected)):
        # batch_size=1: the bad line comes after a batch was already written
        score_local_file(tiny_reranker, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=1)
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == "an earlier result\n"
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_a_bad_parquet_row_is_named_by_its_number(tiny_reranker: Reranker, tmp_path: Path) -> None:
    docs: list[str | None] = [f"d{i}" for i in range(12)]
    docs[9] = None
    pq.write_table(pa.table({"query": ["q"] * 12, "document": docs}), tmp_path / "in.parquet")
    with pytest.raises(
        TypeError, match=re.escape("in.parquet, row 9: document must be a str, got NoneType")
    ):
        score_local_file(
            tiny_reranker, tmp_path / "in.parquet", tmp_path / "o.parquet", batch_size=4
        )
    assert not (tmp_path / "o.parquet").exists()
    assert not (tmp_path / "o.parquet.partial").exists()


def test_arguments_are_checked_before_any_work(cli: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"query": "q", "document": "d"}\n', encoding="utf-8")
    cases = [
        (["in.jsonl", "out.parquet"], "must be a jsonl file like IN"),
        (["in.csv", "out.csv"], "cannot tell the format"),
        (["missing.jsonl", "out.jsonl"], "does not exist"),
        (["in.jsonl", "in.jsonl"], "OUT must not be IN"),
        (["in.jsonl", "out.jsonl", "--concurrency", "3:1"], "MIN:MAX"),
    ]
    for args, message in cases:
        paths = [str(tmp_path / a) if a.endswith(("jsonl", "parquet", "csv")) else a for a in args]
        result = runner.invoke(cli, ["score-file", *paths, "-m", str(tmp_path / "no-model")])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_the_command_reports_a_bad_model_in_one_line(cli: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"query": "q", "document": "d"}\n', encoding="utf-8")
    args = ["score-file", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")]
    result = runner.invoke(cli, [*args, "-m", str(tmp_path / "no-model")])
    assert result.exit_code == 1
    assert "error:" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out.jsonl").exists()
