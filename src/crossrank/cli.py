"""The ``crossrank`` command line (typer)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from crossrank.engine import DEFAULT_MODEL
from crossrank.loading import ModelLoadError, set_local_model_hint
from crossrank.quiet import quiet_third_party
from crossrank.rag.cli import demo, eval_command
from crossrank.score_file import score_file
from crossrank.server.cli import serve
from crossrank.terminal import output_console

app = typer.Typer(
    help="crossrank: fast cross-encoder reranking for RAG pipelines.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # joins a docstring's lines: help that reads whole
)
err_console = Console(stderr=True)

#: Above this many documents a progress bar is shown while scoring.
PROGRESS_THRESHOLD = 256


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """crossrank: fast cross-encoder reranking for RAG pipelines."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


@app.command()
def rerank(
    query: Annotated[str, typer.Argument(help="The search query.")],
    docs: Annotated[list[str] | None, typer.Argument(help="Documents to rank.")] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id or local directory of the reranker.")
    ] = DEFAULT_MODEL,
    docs_file: Annotated[
        str | None,
        typer.Option("--docs-file", "-f", help="File with one document per line ('-' = stdin)."),
    ] = None,
    top_n: Annotated[int | None, typer.Option("--top-n", "-n", help="Keep the best N.")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Keep documents scoring at least this.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    max_length: Annotated[int, typer.Option(help="Tokens per (query, document) pair.")] = 512,
) -> None:
    """Rank documents for a query and print them best first."""
    from crossrank.engine import Reranker

    quiet_third_party()
    set_local_model_hint("--model PATH")
    documents = _read_documents(docs, docs_file)
    if not documents:
        raise typer.BadParameter("no documents given (arguments, --docs-file or stdin)")
    try:
        reranker = Reranker(model, device=device, dtype=dtype, max_length=max_length)
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


# Commands defined beside their features; their heavy dependencies load only when they run.
app.command()(serve)
app.command("score-file")(score_file)
app.command("demo")(demo)
app.command("eval")(eval_command)
