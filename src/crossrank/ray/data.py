"""Batch scoring on Ray Data: :func:`score_dataset` adds a score column to any dataset.

A pool of actors each holds one :class:`~crossrank.Reranker` (one per GPU by default on a
cluster with GPUs) and scores whole batches, which the engine sorts by length and cuts into
token-budgeted forward passes, so larger batches pad less.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import ray.data

from crossrank.engine import Reranker
from crossrank.options import DEFAULT_MODEL
from crossrank.ray.cluster import cluster_has_gpus
from crossrank.tabular import Columns, score_table

__all__ = ["score_dataset"]


class _DatasetScorer:
    """A Ray Data actor: loads one engine, then scores the batches it is given."""

    def __init__(self, model: str, columns: Columns, reranker_options: dict[str, Any]) -> None:
        self.reranker = Reranker(model, **reranker_options)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.reranker, batch, self.columns)


def score_dataset(
    ds: ray.data.Dataset,
    *,
    query_col: str = "query",
    doc_col: str = "document",
    out_col: str = "score",
    model: str = DEFAULT_MODEL,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 1024,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    **reranker_options: Any,
) -> ray.data.Dataset:
    """Score every row of ``ds`` with a pool of reranker actors; lazy, like any Ray Data op.

    Each output row is its input row, all columns unchanged (so an id or order-key column
    survives), plus a float32 ``out_col``; no row is dropped, added or merged. Rows come
    back in input order when the dataset's ``DataContext`` has
    ``execution_options.preserve_order = True``; otherwise join on a key column.

    ``concurrency`` is the actor pool: ``N`` engines, or ``(min, max)`` to let Ray Data grow
    the pool with the backlog. ``num_gpus`` per actor defaults to 1 on a cluster with GPUs
    (one engine per GPU; ``0.5`` packs two per GPU) and 0 otherwise. ``batch_size`` rows go to
    one engine call, which sorts them by length and cuts token-budgeted forward passes, so
    larger batches pad less. Other keyword arguments go to :class:`~crossrank.Reranker`
    (``options=EngineOptions(...)``, ``device``, ``max_length``, ``batch_tokens``...).

    A row whose query is not a non-blank string, or whose document is not a string, fails
    the job with an error that shows the row.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    compute = _actor_pool(concurrency)
    if os.path.exists(model):  # a relative path must mean the same in every actor
        model = os.path.abspath(model)
    if num_gpus is None:
        num_gpus = 1.0 if cluster_has_gpus() else 0.0
    resources: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        _DatasetScorer,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=compute,
        fn_constructor_kwargs={
            "model": model,
            "columns": Columns(query_col, doc_col, out_col),
            "reranker_options": reranker_options,
        },
        udf_modifying_row_count=False,
        **resources,
    )


def _actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    if isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1:
        return ray.data.ActorPoolStrategy(size=concurrency)
    if (
        isinstance(concurrency, tuple)
        and len(concurrency) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in concurrency)
        and 1 <= concurrency[0] <= concurrency[1]
    ):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    raise ValueError(
        f"concurrency must be a positive int or a (min, max) tuple with 1 <= min <= max, "
        f"got {concurrency!r}"
    )
