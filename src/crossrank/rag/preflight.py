"""Can the pipeline's two models be had? Asked before loading them, in a few seconds.

Why: the example scripts load their embedding model through sentence-transformers or
LlamaIndex, whose Hub client retried for 76 s without network and then printed a raw
``OSError`` traceback; ``scripts/demo.sh`` must know before starting whether it runs the
offline path, to announce it as information rather than as an error. Both ask
:func:`unavailable_models` (one Hub probe, :func:`crossrank.loading.hub_access`) and print its
messages, each naming how to pass a local model instead.

``python -m crossrank.rag.preflight`` checks the models named by ``CROSSRANK_EMBED_MODEL``
and ``CROSSRANK_RERANK_MODEL`` (or the defaults): silent with status 0 when both can be had,
else the reasons on stderr and status 1.
"""

from __future__ import annotations

import os
import sys

from crossrank.loading import ModelLoadError, hub_access
from crossrank.rag.models import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_RERANK_MODEL,
    EMBED_MODEL_ENV,
    RERANK_MODEL_ENV,
)


def unavailable_models(embed_model: str, rerank_model: str) -> list[str]:
    """One message per model that is neither local, nor cached, nor downloadable; each names
    the environment variable that takes a local directory instead."""
    problems = []
    for name, env in ((embed_model, EMBED_MODEL_ENV), (rerank_model, RERANK_MODEL_ENV)):
        try:
            hub_access(name, hint=f"{env}=/path/to/model")
        except ModelLoadError as err:
            problems.append(str(err))
    return problems


def exit_if_unavailable(embed_model: str, rerank_model: str) -> None:
    """For scripts: exit at once with the reasons (status 1) when a model cannot be had."""
    problems = unavailable_models(embed_model, rerank_model)
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    exit_if_unavailable(
        os.environ.get(EMBED_MODEL_ENV) or DEFAULT_EMBED_MODEL,
        os.environ.get(RERANK_MODEL_ENV) or DEFAULT_RERANK_MODEL,
    )
