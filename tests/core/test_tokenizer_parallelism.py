"""Scores and token ids are the same whether the Rust tokenizer's own parallelism is on or
off (``TOKENIZERS_PARALLELISM``), since crossrank splits large calls over its own threads;
and crossrank never changes that environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
