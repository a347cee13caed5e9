"""Score every (query, document) row of a Parquet or JSONL file into another file (the
library behind ``crossrank score-file``).

:func:`score_local_file` streams the file batch by batch through one local engine (memory
stays flat for any file size); :func:`score_file_on_ray` has the rows scored by
:func:`crossrank.ray.score_dataset` on the Ray cluster (``RAY_ADDRESS``, else a local one) and
streams them back here in input order. Either way OUT is the input with a score column added,
written to a temporary file that replaces OUT only once every row is scored, so a failed run
never leaves a truncated OUT or ``OUT.partial`` behind, whether it fails, is interrupted
(Ctrl-C) or is terminated (SIGTERM).

A local JSONL file is checked whole before any scoring (valid UTF-8, strict JSON objects, no
lone surrogate in any field, a query and a document in each), so a bad line costs no model
time and its error names the file and line. Each output line is the input line as written
with the score field appended, so fields that are not scored keep their exact text (a long
decimal is not rounded to a float, ``1e400`` does not become ``Infinity``), and every output
line is strict JSON: a non-finite score is an error naming the line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from crossrank.tabular import Columns, RowName, score_rows, score_table
from crossrank.validation import check_query

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

    ``dest`` gets every input row, in order, unchanged (JSONL lines keep their text as
    written), with a float32 score column added. A bad row raises ``ValueError``/``TypeError``
    naming its line (JSONL, from 1, found before any scoring) or row (Parquet, from 0), as does
    a non-finite score, and ``dest`` is left untouched.
    """
    fmt = check_paths(str(source), dest)
    columns = Columns(query_col, doc_col, out_col)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"IN {str(source)!r} does not exist")
    batches = _parquet_batches(path, columns, batch_size) if fmt == "parquet" else None
    with (
        _output(Path(dest), fmt) as out,
        tqdm(
            total=_count_rows(path, fmt, columns), unit="row", desc="scoring", disable=not progress
        ) as bar,
    ):
        if batches is not None:
            for table, name in batches:
                scored = score_table(reranker, table, columns, name, normalize=normalize)
                _check_finite(scored.column(columns.score).to_numpy(), name)
                out.write_table(scored)
                bar.update(table.num_rows)
            return
        for lines in _batched(_jsonl_lines(path, columns), batch_size):
            scores = score_rows(
                reranker,
                [line.query for line in lines],
                [line.document for line in lines],
                columns,
                functools.partial(_line_name, path, lines),
                normalize=normalize,
            )
            out.write_lines(
                [
                    line.with_field(columns.score, score, path)
                    for line, score in zip(lines, scores.tolist(), strict=True)
                ]
            )
            bar.update(len(lines))


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
def _count_rows(path: Path, fmt: str, columns: Columns | None = None) -> int | None:
    """Rows in a local IN, for the progress bar (``None`` for a URI or directory). With
    ``columns``, a JSONL file is checked whole on the way (see :func:`_jsonl_lines`)."""
    if not path.is_file():
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if columns is not None:
        return sum(1 for _ in _jsonl_lines(path, columns))
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass(frozen=True)
class _Line:
    """A checked JSONL record: its line number, its text as written, its query and document."""

    number: int
    text: str
    query: str
    document: str

    def with_field(self, name: str, value: float, path: Path) -> str:
        """The line's own text with ``"name": value`` appended (strict JSON)."""
        if not math.isfinite(value):
            raise ValueError(
                f"{path}, line {self.number}: the model gave a non-finite score ({value}), "
                "which JSON cannot hold"
            )
        body = self.text.rstrip()[:-1].rstrip()  # without the closing brace
        comma = "" if body.endswith("{") else ", "
        return f"{body}{comma}{json.dumps(name, ensure_ascii=False)}: {json.dumps(value)}}}"


def _jsonl_lines(path: Path, columns: Columns) -> Iterator[_Line]:
    """Every record of a JSONL file, checked; blank lines are skipped. The first bad line
    raises ``ValueError``/``TypeError`` naming the file and line: not UTF-8, not a strict
    JSON object (``NaN``/``Infinity`` are not JSON), a lone surrogate in any field, a
    missing column, the score column already present, or a bad query or document."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}, line {number}"
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                    f"{err.start + 1} of the line)"
                ) from None
            if not text.strip():
                continue
            record = _strict_json_object(text, where)
            try:
                columns.check(list(record))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            query, document = record[columns.query], record[columns.document]
            check_query(query, name=f"{where}: {columns.query}")
            if not isinstance(document, str):
                raise TypeError(
                    f"{where}: {columns.document} must be a str, got {type(document).__name__}"
                )
            yield _Line(number, text.rstrip("\r\n"), query, document)


def _strict_json_object(text: str, where: str) -> dict[str, Any]:
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value (write it as a string or null)")

    try:
        record = json.loads(text, parse_constant=refuse_constant)
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    field = _lone_surrogate(record)
    if field is not None:
        raise ValueError(
            f"{where}: field {field} holds a lone UTF-16 surrogate (an unpaired \\ud800-"
            "\\udfff escape), which is not text and cannot be written as UTF-8"
        )
    return record


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path (``'meta'.'tags'[2]``) of the first string holding a lone surrogate, if any."""
    if isinstance(value, str):
        return where or "(the record)" if _has_surrogate(value) else None
    items: Any = ()
    if isinstance(value, dict):
        for key in value:
            if _has_surrogate(key):
                return f"{where}.{key!a}" if where else ascii(key)
        items = ((f"{where}.{k!r}" if where else repr(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    for name, item in items:
        found = _lone_surrogate(item, name)
        if found is not None:
            return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _line_name(path: Path, lines: list[_Line], i: int) -> str:
    return f"{path}, line {lines[i].number}"


def _batched(lines: Iterator[_Line], size: int) -> Iterator[list[_Line]]:
    batch: list[_Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_finite(scores: Any, row_name: RowName) -> None:
    """Refuse a batch holding a non-finite score, naming its first such row."""
    bad = [i for i, score in enumerate(scores.tolist()) if not math.isfinite(score)]
    if bad:
        raise ValueError(f"{row_name(bad[0])}: the model gave a non-finite score")


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

    def write_lines(self, lines: list[str]) -> None:
        assert self._jsonl is not None
        self._jsonl.write("".join(line + "\n" for line in lines))

    def write_records(self, records: list[dict[str, Any]]) -> None:
        """Records as strict JSON lines (a non-finite number is a ``ValueError``)."""
        self.write_lines(
            [json.dumps(r, ensure_ascii=False, default=str, allow_nan=False) for r in records]
        )

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
    """OUT appears, complete, only if the block finishes: a failed, interrupted or
    terminated run leaves neither a truncated OUT nor a partial file behind."""
    with _terminate_as_exit():
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


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` (128 + SIGTERM, the shell's
    status of a terminated process) as Ctrl-C raises ``KeyboardInterrupt``, so cleanup runs;
    the default action would end the process at once. Signal handlers can only be set from
    the main thread: elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
