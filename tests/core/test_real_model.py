"""Published behaviour of the real bge-reranker-v2-m3 (needs its weights on disk)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from crossrank import Reranker

REAL_MODEL = os.environ.get("CROSSRANK_REAL_MODEL")

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not REAL_MODEL,
        reason="set CROSSRANK_REAL_MODEL to a local bge-reranker-v2-m3 directory to run",
    ),
]


def test_red_planet_ranks_mars_first() -> None:
    rr = Reranker(str(REAL_MODEL))
    docs = [
        "Jupiter is the largest planet in the solar system.",
        "Mars is often called the Red Planet because of the iron oxide on its surface.",
        "Venus is the hottest planet, with a thick carbon dioxide atmosphere.",
        "火星因其表面的氧化铁而呈红色。",
    ]
    results = rr.rerank("Which planet is known as the Red Planet?", docs)
    assert results[0].index in (1, 3)
    assert results[0].index == 1 or results[1].index == 1
    scores = np.array([r.score for r in results])
    assert ((scores >= 0) & (scores <= 1)).all()
