"""Every ``python`` block of docs/migrating.md runs, offline, on the tiny random model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")
pytest.importorskip("llama_index.core")

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
REAL_MODEL = '"BAAI/bge-reranker-v2-m3"'


def test_the_guide_has_a_block_per_library() -> None:
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_snippet_runs(block: str, tiny_model_dir: Path) -> None:
    assert REAL_MODEL in block  # each snippet names the real model the test replaces
    code = block.replace(REAL_MODEL, repr(str(tiny_model_dir)))
    exec(compile(code, str(DOC), "exec"), {"__name__": "migrating_snippet"})
