"""Scores and token ids are the same whether the Rust tokenizer's own parallelism is on or
off (``TOKENIZERS_PARALLELISM``), since crossrank splits large calls over its own threads
where the tokenizer does not parallelize (and only there); and crossrank never changes that
environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossrank.tokenization import chunk_bounds, rust_parallelism, split_call

pytestmark = pytest.mark.timeout(900)  # two fresh interpreters load torch and the model

SCRIPT = r"""
import hashlib, json, os, sys
from crossrank import Reranker
from crossrank.tokenization import tokenizer_threads
docs = json.loads(sys.stdin.read())
before = os.environ.get("TOKENIZERS_PARALLELISM")
reranker = Reranker(sys.argv[1], device="cpu")
queries = ["Which river flows through the city?"] * len(docs)
encoded = reranker.encode(queries, docs)
scores = reranker.score(queries[0], docs, normalize=False)
print(json.dumps({
    "ids": hashlib.sha256(encoded.ids.tobytes() + encoded.lengths.tobytes()).hexdigest(),
    "scores": scores.tolist(),
    "env": [before, os.environ.get("TOKENIZERS_PARALLELISM")],
    "threads": tokenizer_threads(),
}))
"""


def run_with(setting: str, model: Path, docs: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": setting}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        input=json.dumps(docs),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scores_and_ids_do_not_depend_on_the_tokenizers_parallelism(
    tiny_model_dir: Path, xquad: dict
) -> None:
    contexts = [item["context"] for item in xquad["questions"][:80]]
    docs = contexts + [" ".join(contexts[i : i + 5]) for i in range(0, 50, 5)]
    on = run_with("true", tiny_model_dir, docs)
    off = run_with("false", tiny_model_dir, docs)
    assert on["ids"] == off["ids"]
    assert on["scores"] == off["scores"]
    assert len(on["scores"]) == len(docs)
    assert on["env"] == ["true", "true"] and off["env"] == ["false", "false"]  # left alone
    assert on["threads"] >= 1


def chunks_of_a_call(n: int) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    split_call(lambda lo, hi: seen.append((lo, hi)), n)
    return sorted(seen)


@pytest.mark.parametrize("setting", ["false", "0", "OFF", ""])
def test_calls_are_split_over_own_threads_when_the_tokenizer_does_not_parallelize(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
    monkeypatch.setattr("crossrank.tokenization.tokenizer_threads", lambda: 4)
    assert not rust_parallelism()
    assert chunks_of_a_call(50) == [(0, 25), (25, 50)]  # a small call: half the threads
    assert chunks_of_a_call(400) == [(0, 100), (100, 200), (200, 300), (300, 400)]


@pytest.mark.parametrize(
    ("n", "threads", "chunks"),
    [(50, 16, 8), (50, 2, 2), (50, 3, 2), (3, 16, 1), (127, 16, 8), (128, 16, 16), (600, 2, 3)],
)
def test_small_calls_take_half_the_threads_and_large_ones_all(
    n: int, threads: int, chunks: int
) -> None:
    bounds = chunk_bounds(n, threads)
    assert len(bounds) - 1 == chunks
    assert bounds[0] == 0 and bounds[-1] == n and all(np.diff(bounds) >= 1)


@pytest.mark.parametrize("setting", [None, "true", "1"])
def test_a_call_goes_whole_to_the_tokenizer_when_it_parallelizes_itself(
    monkeypatch: pytest.MonkeyPatch, setting: str | None
) -> None:
    if setting is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
    monkeypatch.setattr("crossrank.tokenization.tokenizer_threads", lambda: 4)
    assert rust_parallelism()
    assert chunks_of_a_call(50) == [(0, 50)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_splits_over_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the tokenizer may have turned its parallelism off
        os.write(write, b"off" if not rust_parallelism() else b"on")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 8) == b"off"
    assert rust_parallelism()  # the parent is unchanged
