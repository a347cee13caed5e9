"""Score rows that hold a query column and a document column.

This is the one place where table-shaped input meets the engine: ``crossrank.ray.score_dataset``
(inside each Ray Data actor) and ``crossrank score-file`` (local files) both go through it, so
a bad row gets the same error naming it, wherever it is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crossrank.engine import Reranker
from crossrank.validation import check_query

if TYPE_CHECKING:
    import pyarrow as pa

RowName = Callable[[int], str]
"""Names row ``i`` of a batch in an error message (``"line 12"``, ``"row 4031"``...)."""

_PREVIEW_CHARS = 200


@dataclass(frozen=True)
class Columns:
    """Which columns (or JSON fields) hold the query and the document, and which gets the score."""

    query: str = "query"
    document: str = "document"
    score: str = "score"

    def check(self, names: Sequence[str]) -> None:
        """Refuse a table that lacks an input column or already has the score column."""
        for role, name in (("query", self.query), ("document", self.document)):
            if name not in names:
                raise ValueError(f"no {role} column {name!r}; the columns are {list(names)}")
        if self.score in names:
            raise ValueError(
                f"the input already has a column {self.score!r}; choose another score column "
                "so that it is not overwritten"
            )


def score_rows(
    reranker: Reranker,
    queries: Sequence[object],
    documents: Sequence[object],
    columns: Columns,
    row_name: RowName,
    *,
    normalize: bool | None = None,
) -> np.ndarray:
    """Scores of ``zip(queries, documents)`` in row order, after checking every row.

    A query must be a non-blank string and a document a string (empty is scored); the first
    row that is not raises ``TypeError``/``ValueError`` naming that row and column.
    ``normalize`` overrides the reranker's setting, as in :meth:`Reranker.score_pairs`.
    """
    for i, (query, document) in enumerate(zip(queries, documents, strict=True)):
        check_query(query, name=f"{row_name(i)}: {columns.query}")
        if not isinstance(document, str):
            raise TypeError(
                f"{row_name(i)}: {columns.document} must be a str, got {type(document).__name__}"
            )
    pairs = list(zip(queries, documents, strict=True))
    return reranker.score_pairs(pairs, normalize=normalize)  # type: ignore[arg-type]


def score_table(
    reranker: Reranker,
    table: pa.Table,
    columns: Columns,
    row_name: RowName | None = None,
    *,
    normalize: bool | None = None,
) -> pa.Table:
    """``table`` with a float32 score column appended; every row and column is kept as is.

    Without ``row_name``, a bad row is named by its content (a Ray Data batch has no global
    row number).
    """
    import pyarrow as pa

    columns.check(table.column_names)
    if row_name is None:

        def row_name(i: int) -> str:
            text = repr(table.slice(i, 1).to_pylist()[0])
            return "row " + (text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…")

    scores = score_rows(
        reranker,
        table.column(columns.query).to_pylist(),
        table.column(columns.document).to_pylist(),
        columns,
        row_name,
        normalize=normalize,
    )
    return table.append_column(
        pa.field(columns.score, pa.float32()), pa.array(scores, pa.float32())
    )
