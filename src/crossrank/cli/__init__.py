"""The ``crossrank`` command line (typer): ``rerank``, ``serve``, ``score-file``, ``demo``,
``eval``.

Every command lives in its own module of this package and shares the model and engine
flags of :mod:`crossrank.cli.common`. No command imports the engine (torch, transformers),
the server or Ray before it runs, so ``crossrank --help`` answers at once.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from crossrank.cli import rag, rerank, score_file, serve

app = typer.Typer(
    help="crossrank: fast cross-encoder reranking for RAG pipelines.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """crossrank: fast cross-encoder reranking for RAG pipelines."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


app.command("rerank")(rerank.rerank)
app.command("serve")(serve.serve)
app.command("score-file")(score_file.score_file)
app.command("demo")(rag.demo)
app.command("eval")(rag.eval_command)

__all__ = ["app"]
