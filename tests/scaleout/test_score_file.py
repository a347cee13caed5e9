"""``crossrank score-file`` on local files, without Ray: every row kept, in order, scored.

Most cases call :func:`score_local_file` with the session's tiny reranker (loading a model per
CLI call costs seconds); the CLI itself is run once end to end and for its argument checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
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


# ------------------------------------------------------------ hardening (faults 7, 8, 13)
def _never_scored(monkeypatch: pytest.MonkeyPatch, reranker: Reranker) -> list[int]:
    """Record the size of each scoring call (a bad file must be refused before any)."""
    calls: list[int] = []
    score_pairs = reranker.score_pairs

    def spy(pairs, **kw):
        calls.append(len(pairs))
        return score_pairs(pairs, **kw)

    monkeypatch.setattr(reranker, "score_pairs", spy)
    return calls


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (b'{"query": "q", "document": "caf\xe9"}', "line 4: not valid UTF-8 (byte 0xe9"),
        (
            b'{"query": "q", "document": "d", "meta": {"x": ["ok", "\\ud800"]}}',
            "line 4: field 'meta'.'x'[1] holds a lone UTF-16 surrogate",
        ),
        (b'{"query": "\\udfff?", "document": "d"}', "line 4: field 'query' holds a lone"),
        (
            b'{"query": "q", "document": "d", "v": NaN}',
            "line 4: not valid JSON (NaN is not a JSON value",
        ),
        (b'{"query": "q", "document": "d", "v": -Infinity}', "line 4: not valid JSON (-Infinity"),
    ],
)
def test_a_bad_line_anywhere_is_named_before_any_scoring(
    tiny_reranker: Reranker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bad_line: bytes,
    expected: str,
) -> None:
    good = [json.dumps({"query": "q", "document": f"d{i}"}).encode() for i in range(3)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([*good, bad_line, *good]) + b"\n")
    calls = _never_scored(monkeypatch, tiny_reranker)
    with pytest.raises(ValueError, match=re.escape(f"in.jsonl, line {expected[5:]}")):
        score_local_file(tiny_reranker, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=1)
    assert calls == []  # validated up front: no model time spent on a file that will fail
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_unscored_fields_keep_their_text_and_output_is_strict_json(
    tiny_reranker: Reranker, tmp_path: Path
) -> None:
    lines = [
        '{"query": "q", "document": "Mars", "big": 1e400, "small": -1e-400, '
        '"dec": 0.1234567890123456789012345, "int": 123456789012345678901234567890}',
        '{ "document" : "é\\u00e9 \\ud83d\\ude00" ,"query":"q" , "x": [1.0, 2.50] }  ',
        '{"query": "q", "document": "", "meta": {"nested": {"deep": 1E+2}}}\r',
    ]
    (tmp_path / "in.jsonl").write_bytes(("\n".join(lines) + "\n").encode())
    score_local_file(tiny_reranker, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    out = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(out) == len(lines)

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the output is not strict JSON")

    records = [json.loads(line, parse_constant=refuse, parse_float=Decimal) for line in out]
    expected = _expected(tiny_reranker, [json.loads(line) for line in lines])
    np.testing.assert_allclose([float(r["score"]) for r in records], expected, atol=1e-5)
    for line, written in zip(lines, out, strict=True):
        # every byte of the input record is kept; the score is appended before the brace
        body = line.rstrip()[:-1].rstrip()
        assert written.startswith(body + ', "score": '), written
    assert records[0]["dec"] == Decimal("0.1234567890123456789012345")
    assert records[0]["int"] == 123456789012345678901234567890


def test_a_non_finite_score_is_an_error_naming_the_line(
    tiny_reranker: Reranker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"query": "q", "document": f"d{i}"} for i in range(4)]
    _write_jsonl(tmp_path / "in.jsonl", rows, blank_after=1)

    def nan_at_third(pairs, **kw):
        scores = np.arange(len(pairs), dtype=np.float32)
        scores[2] = np.nan
        return scores

    monkeypatch.setattr(tiny_reranker, "score_pairs", nan_at_third)
    with pytest.raises(ValueError, match=r"in\.jsonl, line 4: the model gave a non-finite"):
        score_local_file(tiny_reranker, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.partial").exists()


_SLOW_SCORING = """
import signal, sys, time
import numpy as np
from crossrank.score_file import score_local_file

# a shell starts background jobs with SIGINT ignored: restore Ctrl-C for the SIGINT case
signal.signal(signal.SIGINT, signal.default_int_handler)

class SlowReranker:  # stands in for the model: one batch a second
    def score_pairs(self, pairs, normalize=None):
        time.sleep(1)
        return np.zeros(len(pairs), dtype=np.float32)

score_local_file(SlowReranker(), sys.argv[1], sys.argv[2], batch_size=1, progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_termination_and_interruption_leave_no_partial_file(tmp_path: Path, sig: int) -> None:
    rows = [{"query": "q", "document": "d" * 100_000} for _ in range(60)]
    _write_jsonl(tmp_path / "in.jsonl", rows)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_SCORING,
            str(tmp_path / "in.jsonl"),
            str(tmp_path / "out.jsonl"),
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    partial = tmp_path / "out.jsonl.partial"
    try:
        while not (partial.exists() and partial.stat().st_size > 0):
            assert process.poll() is None, "the scoring process ended before writing"
            time.sleep(0.1)
        process.send_signal(sig)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # SIGTERM: the status a shell gives a terminated process; SIGINT: Python's own re-raise
    assert returncode == (143 if sig == signal.SIGTERM else -signal.SIGINT)
    assert not partial.exists()
    assert not (tmp_path / "out.jsonl").exists()
