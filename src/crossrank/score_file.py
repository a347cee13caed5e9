"""Score every (query, document) row of a Parquet or JSONL file into another file (the
library behind ``crossrank score-file``).

:func:`score_local_file` streams the file batch by batch through one local engine (memory
stays flat for any file size); :func:`score_file_on_ray` has the rows scored by
:func:`crossrank.ray.score_dataset` on the Ray cluster (``RAY_ADDRESS``, else a local one) and
streams them back here in input order. Either way OUT is the input with a score column added,
written to a temporary file that replaces OUT only once every row is scored, so a failed run
never leaves a truncated OUT behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from crossrank.tabular import Columns, RowName, score_rows, score_table

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossrank.engine import Reranker

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def check_paths(source: str, dest: str | os.PathLike[str]) -> str:
    """The common format of IN and OUT (``"parquet"`` or ``"jsonl"``), from their suffixes."""
    fmt = _format(source)
    if _format(str(dest)) != fmt:
        raise ValueError(f"OUT must be a {fmt} file like IN, got {str(dest)!r}")
    if Path(dest).resolve() == Path(source).resolve():
        raise ValueError("OUT must not be IN")
    return fmt


def _format(path: str) -> str:
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {path!r} from its name; use a {', '.join(_FORMATS)} file"
        )
    return fmt


def score_local_file(
    reranker: Reranker,
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    query_col: str = "query",
    doc_col: str = "document",
    out_col: str = "score",
    batch_size: int = 1024,
    normalize: bool | None = None,
    progress: bool = True,
) -> None:
    """Score a local Parquet or JSONL file into ``dest`` with ``reranker``, batch by batch.

    ``dest`` gets every input row, in order, unchanged (JSONL records keep every field as
    written), with a float32 score column added. A bad row raises ``ValueError``/``TypeError``
    naming its line (JSONL, from 1) or row (Parquet, from 0), and ``dest`` is left untouched.
    """
    fmt = check_paths(str(source), dest)
    columns = Columns(query_col, doc_col, out_col)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"IN {str(source)!r} does not exist")
    batches = _parquet_batches(path, columns, batch_size) if fmt == "parquet" else None
    with (
        _output(Path(dest), fmt) as out,
        tqdm(total=_count_rows(path, fmt), unit="row", desc="scoring", disable=not progress) as bar,
    ):
        if batches is not None:
            for table, name in batches:
                out.write_table(score_table(reranker, table, columns, name, normalize=normalize))
                bar.update(table.num_rows)
            return
        for records, name in _jsonl_batches(path, columns, batch_size):
            scores = score_rows(
                reranker,
                [r[columns.query] for r in records],
                [r[columns.document] for r in records],
                columns,
                name,
                normalize=normalize,
            )
            for record, score in zip(records, scores.tolist(), strict=True):
                record[columns.score] = score
            out.write_records(records)
            bar.update(len(records))


def score_file_on_ray(
    source: str,
    dest: str | os.PathLike[str],
    *,
    model: str,
    query_col: str = "query",
    doc_col: str = "document",
    out_col: str = "score",
    batch_size: int = 1024,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    progress: bool = True,
    **reranker_options: Any,
) -> None:
    """Score a Parquet or JSONL file (any path or URI every Ray node can read) on the Ray
    cluster with :func:`crossrank.ray.score_dataset`; ``dest`` is written here, in input order.

    Sets ``preserve_order`` on this process's Ray ``DataContext``.
    """
    from crossrank.errors import require_extra

    ray_data = require_extra("ray.data", "ray", feature="scoring a file on Ray")
    from crossrank.ray import score_dataset

    fmt = check_paths(source, dest)
    context = ray_data.DataContext.get_current()
    context.execution_options.preserve_order = True  # OUT keeps the input's row order
    context.enable_progress_bars = False  # one bar, ours, counting rows written
    if fmt == "parquet":
        ds = ray_data.read_parquet(source)
    else:
        ds = ray_data.read_json(source, lines=True)
    scored = score_dataset(
        ds,
        query_col=query_col,
        doc_col=doc_col,
        out_col=out_col,
        model=model,
        concurrency=concurrency,
        batch_size=batch_size,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        **reranker_options,
    )
    total = _count_rows(Path(source), fmt)
    with (
        _output(Path(dest), fmt) as out,
        tqdm(total=total, unit="row", desc="scoring", disable=not progress) as bar,
    ):
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = cast("pa.Table", batch)
            out.write_table(table)
            bar.update(table.num_rows)


# ------------------------------------------------------------------------ reading
def _count_rows(path: Path, fmt: str) -> int | None:
    """Rows in a local IN, for the progress bar (``None`` for a URI or directory)."""
    if not path.is_file():
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _jsonl_batches(
    path: Path, columns: Columns, batch_size: int
) -> Iterator[tuple[list[dict[str, Any]], RowName]]:
    """Checked records in batches, with a namer of each record's line; blank lines are
    skipped."""
    lines: list[int] = []
    records: list[dict[str, Any]] = []

    def batch() -> tuple[list[dict[str, Any]], RowName]:
        numbers = lines.copy()
        return records.copy(), lambda i: f"{path}, line {numbers[i]}"

    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object")
            try:
                columns.check(list(record))
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: {err}") from None
            lines.append(number)
            records.append(record)
            if len(records) == batch_size:
                yield batch()
                lines.clear()
                records.clear()
    if records:
        yield batch()


def _parquet_batches(
    path: Path, columns: Columns, batch_size: int
) -> Iterator[tuple[pa.Table, RowName]]:
    """Tables of ``batch_size`` rows, with a namer of each row's number; one empty table, of
    the file's schema, for a file without rows (so that OUT gets that schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    try:
        columns.check(parquet.schema_arrow.names)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

    def generate() -> Iterator[tuple[pa.Table, RowName]]:
        if parquet.metadata.num_rows == 0:
            yield parquet.schema_arrow.empty_table(), str
        first = 0
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield pa.Table.from_batches([batch]), functools.partial(_row_name, path, first)
            first += batch.num_rows

    return generate()


def _row_name(path: Path, first: int, i: int) -> str:
    return f"{path}, row {first + i}"


# ------------------------------------------------------------------------ writing
class _Output:
    """Writes batches to ``OUT.partial``, which :func:`_output` renames to ``OUT`` at the end."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.fmt = fmt
        self.partial = path.with_name(path.name + ".partial")
        self._jsonl = self.partial.open("w", encoding="utf-8") if fmt == "jsonl" else None
        self._parquet: pq.ParquetWriter | None = None

    def write_records(self, records: list[dict[str, Any]]) -> None:
        assert self._jsonl is not None
        for record in records:
            self._jsonl.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def write_table(self, table: pa.Table) -> None:
        if self.fmt == "jsonl":
            self.write_records(table.to_pylist())
            return
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.partial, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._parquet is not None:
            self._parquet.close()


@contextlib.contextmanager
def _output(path: Path, fmt: str) -> Iterator[_Output]:
    """OUT appears, complete, only if the block finishes: a failed or interrupted run leaves
    neither a truncated OUT nor a partial file behind."""
    out = _Output(path, fmt)
    try:
        yield out
        out.close()
        if not out.partial.exists():
            if fmt == "parquet":  # a Parquet file needs a schema, which no batch gave
                raise ValueError("no rows came back to write; is IN empty?")
            out.partial.touch()
        os.replace(out.partial, path)
    except BaseException:
        out.close()
        out.partial.unlink(missing_ok=True)
        raise
