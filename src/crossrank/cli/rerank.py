"""``crossrank rerank``: rank documents for one query and print them, best first."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from crossrank.cli.common import Model, engine_command
from crossrank.errors import ModelLoadError
from crossrank.options import DEFAULT_MODEL, EngineOptions
from crossrank.quiet import quiet_third_party
from crossrank.terminal import output_console
from crossrank.validation import check_threshold

err_console = Console(stderr=True)

#: Above this many documents a progress bar is shown while scoring.
PROGRESS_THRESHOLD = 256


def _read_documents(docs: list[str] | None, docs_file: str | None) -> list[str]:
    if docs_file is None:
        return list(docs or [])
    if docs:
        raise typer.BadParameter("give documents as arguments or with --docs-file, not both")
    if docs_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(docs_file)
        if not path.is_file():
            raise typer.BadParameter(f"--docs-file {docs_file!r} does not exist")
        text = path.read_text(encoding="utf-8")
    return text.splitlines()


@engine_command()
def rerank(
    query: Annotated[str, typer.Argument(help="The search query.")],
    docs: Annotated[list[str] | None, typer.Argument(help="Documents to rank.")] = None,
    model: Model = DEFAULT_MODEL,
    docs_file: Annotated[
        str | None,
        typer.Option("--docs-file", "-f", help="File with one document per line ('-' = stdin)."),
    ] = None,
    top_n: Annotated[int | None, typer.Option("--top-n", "-n", help="Keep the best N.")] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", "--score-threshold", help="Keep documents scoring at least this."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    *,
    engine: EngineOptions,
) -> None:
    """Rank documents for a query and print them best first."""
    from crossrank.engine import Reranker
    from crossrank.loading import set_local_model_hint

    quiet_third_party()
    set_local_model_hint("--model PATH")
    try:
        check_threshold(threshold)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--threshold") from None
    documents = _read_documents(docs, docs_file)
    if not documents:
        raise typer.BadParameter("no documents given (arguments, --docs-file or stdin)")
    try:
        reranker = Reranker(model, engine)
        results = reranker.rerank(
            query,
            documents,
            top_n=top_n,
            threshold=threshold,
            show_progress=len(documents) > PROGRESS_THRESHOLD,
        )
    except (ModelLoadError, ValueError, TypeError) as err:
        err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    if as_json:
        payload = [{"index": r.index, "score": r.score, "document": r.document} for r in results]
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    table = Table(title=f"{query}  ({len(results)} of {len(documents)} documents)")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("index", justify="right")
    table.add_column("document", overflow="fold")
    for rank, result in enumerate(results, 1):
        preview = result.document if len(result.document) <= 200 else result.document[:200] + "…"
        table.add_row(str(rank), f"{result.score:.4f}", str(result.index), preview)
    output_console().print(table)
