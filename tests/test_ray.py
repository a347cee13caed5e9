"""Scale-out on a local Ray cluster (``ray.init(num_cpus=2)``): Ray Data scoring, Ray Serve.

One cluster for the whole module; actors ask for fractions of a CPU so that a pool and a
Serve deployment fit on a 2-core machine. Select with ``-m ray``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crossrank import Reranker

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

    from crossrank.score_file import score_file, score_local_file

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
