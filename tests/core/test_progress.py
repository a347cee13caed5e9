"""crossrank.progress: a line at least every ``interval`` seconds when the output is a pipe,
and a heartbeat for one long call."""

from __future__ import annotations

import io
import threading

from crossrank.progress import progress, working


def test_piped_progress_writes_plain_lines_and_a_final_one() -> None:
    out = io.StringIO()  # not a terminal
    items = list(progress(range(5), "eval demo", unit="queries", interval=0.0, stream=out))
    assert items == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval demo: 1/5 queries (20%)")
    assert lines[-1].startswith("eval demo: 5/5 queries (100%)") and lines[-1].endswith("done")
    assert "\r" not in out.getvalue()  # no bar redraws in a log


def test_piped_progress_waits_for_the_interval() -> None:
    out = io.StringIO()
    list(progress(iter(range(100)), "scoring", interval=3600.0, stream=out))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the last
    assert "scoring: 100 it," in out.getvalue()  # no total known: a count, no percentage


def test_working_beats_until_the_call_returns() -> None:
    out = io.StringIO()
    release = threading.Event()
    with working("exporting to ONNX", interval=0.01, stream=out):
        threading.Timer(0.2, release.set).start()
        release.wait(5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "exporting to ONNX …"
    assert any(line.startswith("still exporting to ONNX (") for line in lines[1:-1])
    assert lines[-1].startswith("exporting to ONNX: done in ")


def test_working_says_nothing_more_when_the_call_fails() -> None:
    out = io.StringIO()
    try:
        with working("loading the models", interval=60, stream=out):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert out.getvalue().splitlines() == ["loading the models …"]
