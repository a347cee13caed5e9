"""Progress for long work in the commands: a bar on a terminal, a line now and then otherwise.

Why: ``crossrank eval --dataset xquad-r`` ran 7.5 minutes with no output at all when its
output went to a pipe or a CI log (rich's bars draw nothing there), and a newcomer could not
tell it from a hang. On a terminal :func:`progress` draws a tqdm bar; elsewhere it writes one
plain line at most every ``interval`` seconds (default :data:`LOG_INTERVAL`, 30 s) and one
when the work is done. :func:`working` does the same for one long call with no steps (an
ONNX export): a heartbeat line every ``interval`` seconds while it runs.

Output goes to stderr, so piped results (``--json -``, tables) stay clean.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL = 30.0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    items: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    unit: str = "it",
    interval: float = LOG_INTERVAL,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Yield ``items``, reporting progress to ``stream`` (default stderr)."""
    out = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _is_terminal(out):
        yield from tqdm(items, desc=description, total=total, unit=unit, file=out, leave=False)
        return
    began = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            last = now
            print(_line(description, done, total, unit, now - began), file=out, flush=True)
    print(_line(description, done, total, unit, time.monotonic() - began, "done"), file=out)


def _line(
    description: str, done: int, total: int | None, unit: str, elapsed: float, state: str = ""
) -> str:
    count = f"{done}/{total} {unit} ({100 * done // total}%)" if total else f"{done} {unit}"
    return f"{description}: {count}, {_duration(elapsed)}{' ' + state if state else ''}"


@contextmanager
def working(
    description: str, *, interval: float = LOG_INTERVAL, stream: TextIO | None = None
) -> Iterator[None]:
    """Announce one long call, then write ``still <description> (1m00s)`` every ``interval``
    seconds until it returns, and how long it took."""
    out = stream or sys.stderr
    print(f"{description} …", file=out, flush=True)
    began = time.monotonic()
    finished = threading.Event()

    def heartbeat() -> None:
        while not finished.wait(interval):
            elapsed = _duration(time.monotonic() - began)
            print(f"still {description} ({elapsed})", file=out, flush=True)

    beat = threading.Thread(target=heartbeat, name="crossrank-progress", daemon=True)
    beat.start()
    try:
        yield
    finally:  # on an error, the error's own message follows: no "done" line
        finished.set()
        beat.join()
    print(f"{description}: done in {_duration(time.monotonic() - began)}", file=out, flush=True)
