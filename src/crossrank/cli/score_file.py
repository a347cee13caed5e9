"""``crossrank score-file IN OUT``: score every (query, document) row of a Parquet or JSONL
file, locally or on Ray (``--ray``), with :mod:`crossrank.score_file`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from crossrank.cli.common import Model, engine_command
from crossrank.errors import CrossrankError
from crossrank.options import DEFAULT_MODEL, EngineOptions
from crossrank.quiet import quiet_third_party

_err = Console(stderr=True)


def _parse_concurrency(value: str) -> int | tuple[int, int]:
    try:
        if ":" in value:
            low, high = (int(part) for part in value.split(":", 1))
            if 1 <= low <= high:
                return (low, high)
        elif int(value) >= 1:
            return int(value)
    except ValueError:
        pass
    raise typer.BadParameter(
        f"--concurrency must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}"
    )


Source = Annotated[str, typer.Argument(metavar="IN", help="Input .parquet or .jsonl file.")]
Dest = Annotated[
    Path, typer.Argument(metavar="OUT", help="Output file (.parquet or .jsonl, same as IN).")
]
QueryCol = Annotated[str, typer.Option(help="Column (or JSON field) with the query.")]
DocCol = Annotated[str, typer.Option(help="Column (or JSON field) with the document.")]
OutCol = Annotated[str, typer.Option(help="Column (or JSON field) to add with the score.")]
BatchSize = Annotated[
    int, typer.Option(min=1, help="Rows per engine call (sorted by length inside).")
]
RawScores = Annotated[
    bool, typer.Option("--raw-scores", help="Write logits instead of probabilities.")
]
UseRay = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Score on the Ray cluster at RAY_ADDRESS (else a local one); IN must then be "
        "readable by every node (shared disk, s3://...).",
    ),
]
Concurrency = Annotated[
    str, typer.Option(help="With --ray: N engines, or MIN:MAX to autoscale the pool.")
]
NumGpus = Annotated[
    float | None,
    typer.Option(help="With --ray: GPUs per engine (default 1 on a GPU cluster, else 0)."),
]


@engine_command(skip={"normalize"})  # --raw-scores says it for this command
def score_file(
    source: Source,
    dest: Dest,
    model: Model = DEFAULT_MODEL,
    query_col: QueryCol = "query",
    doc_col: DocCol = "document",
    out_col: OutCol = "score",
    batch_size: BatchSize = 1024,
    raw_scores: RawScores = False,
    use_ray: UseRay = False,
    concurrency: Concurrency = "1",
    num_gpus: NumGpus = None,
    *,
    engine: EngineOptions,
) -> None:
    """Score every (query, document) row of a Parquet or JSONL file into OUT, which keeps every
    input row, in order, with a score column added."""
    from crossrank.score_file import check_paths, score_file_on_ray, score_local_file

    try:
        check_paths(source, dest)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if not use_ray and not Path(source).is_file():
        raise typer.BadParameter(f"IN {source!r} does not exist")
    pool = _parse_concurrency(concurrency)
    from crossrank.loading import set_local_model_hint

    quiet_third_party()
    set_local_model_hint("--model PATH")
    common: dict[str, Any] = {
        "query_col": query_col,
        "doc_col": doc_col,
        "out_col": out_col,
        "batch_size": batch_size,
        "normalize": not raw_scores,
    }
    try:
        if use_ray:
            score_file_on_ray(
                source,
                dest,
                model=model,
                concurrency=pool,
                num_gpus=num_gpus,
                options=engine,
                **common,
            )
        else:
            from crossrank.engine import Reranker

            score_local_file(Reranker(model, engine), source, dest, **common)
    except Exception as err:
        if not _reported(err):
            raise
        _err.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=1) from None


def _reported(err: Exception) -> bool:
    """A bad file, row, model or cluster: told in one message, not a traceback. On Ray a bad
        row arrives as a ``RayError`` whose message carries the row's own error. A missing extra
    (``crossrank[ray]``) is a ``CrossrankError`` naming it."""
    if isinstance(err, (CrossrankError, ValueError, TypeError, OSError)):
        return True
    return type(err).__module__.startswith("ray.")
