"""Property-based fuzzing of the engine's inputs (hypothesis), on the tiny random model.

Any unicode (lone surrogates, controls, zero-width and direction marks included), 0 to 8
documents of any length, wrong types anywhere, and top_n/threshold values of every kind. For
every input the engine either raises a ``TypeError``/``ValueError`` naming the bad item, or
answers correctly: indices are distinct and in range, results are best first, exactly the
documents a threshold and top_n keep are returned, and each score is that document's score
from :meth:`Reranker.score` in the same call shape.

Bounded so the suite stays fast: ``derandomize`` (the same examples on every run, no flaky
CI), ``max_examples`` small, no deadline (a loaded CI machine is slow, not wrong).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossrank import Reranker

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

#: Characters a careless or hostile caller sends: zero-width, BOM, controls, direction
#: overrides, lone surrogates, combining marks, line and paragraph separators.
_SPECIAL = [
    "\u200b",
    "\u200d",
    "\ufeff",
    "\x00",
    "\x1b",
    "\u202e",
    "\ud800",
    "\udfff",
    "\u0301",
    "\u2028",
    "\n",
    "\t",
    " ",
]
_CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(_SPECIAL))
TEXT = st.one_of(
    st.text(_CHARS, max_size=40),
    st.builds(lambda t, n: t * n, st.text(_CHARS, min_size=1, max_size=8), st.integers(50, 200)),
)
NOT_STR = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=3), max_size=2),
)
DOCUMENTS = st.lists(st.one_of(TEXT, TEXT, TEXT, NOT_STR), max_size=8)
TOP_N = st.one_of(st.none(), st.integers(-2, 12), st.booleans(), st.floats(), st.text(max_size=3))
GOOD_THRESHOLD = st.one_of(st.none(), st.floats(-1.0, 2.0), st.integers(-1, 2))
BAD_THRESHOLD = st.one_of(
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.floats(), max_size=2),
    st.sampled_from([math.nan, math.inf, -math.inf, "0.5"]),
)


def _outcome(call: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """``(result, None)``, or ``(None, error)`` for a ``TypeError``/``ValueError``."""
    try:
        return call(), None
    except (TypeError, ValueError) as err:
        return None, err


def _visible(text: Any) -> bool:
    """A str with a letter, digit, punctuation or symbol: a query no rule may refuse."""
    return isinstance(text, str) and any(unicodedata.category(c)[0] in "LNPS" for c in text)


def _first_bad_document(documents: list[Any]) -> int | None:
    return next((i for i, d in enumerate(documents) if not isinstance(d, str)), None)


def _valid_top_n(top_n: Any) -> bool:
    return top_n is None or (type(top_n) is int and top_n > 0)


@FUZZ
@given(
    query=st.one_of(TEXT, TEXT, NOT_STR), documents=DOCUMENTS, top_n=TOP_N, threshold=GOOD_THRESHOLD
)
def test_rerank_answers_correctly_or_names_the_bad_item(
    tiny_reranker: Reranker, query: Any, documents: list[Any], top_n: Any, threshold: Any
) -> None:
    given_docs = list(documents)
    results, error = _outcome(
        lambda: tiny_reranker.rerank(query, documents, top_n=top_n, threshold=threshold)
    )
    assert documents == given_docs  # the caller's list is never changed
    bad_doc = _first_bad_document(documents)
    if error is not None:  # refused: for a reason that holds, named
        message = str(error)
        if message.startswith("top_n"):
            assert not _valid_top_n(top_n), message
        elif message.startswith("documents"):
            assert f"documents[{bad_doc}]" in message, message  # the first bad one
        else:
            assert message.startswith("query") and not _visible(query), message
        return
    assert bad_doc is None and _valid_top_n(top_n) and isinstance(query, str) and query.strip()
    scores = tiny_reranker.score(query, documents)
    assert scores.shape == (len(documents),) and np.isfinite(scores).all()
    indices = [r.index for r in results]
    kept = [i for i in range(len(documents)) if threshold is None or scores[i] >= threshold]
    assert indices == sorted(kept, key=lambda i: -scores[i])[:top_n]  # stable: ties by index
    for result in results:
        assert result.document is documents[result.index]
        assert result.score == pytest.approx(float(scores[result.index]), abs=1e-6)


@settings(FUZZ, max_examples=25)  # three scoring calls per example
@given(query=TEXT, documents=st.lists(TEXT, max_size=8))
def test_score_keeps_input_order_and_every_document(
    tiny_reranker: Reranker, query: str, documents: list[str]
) -> None:
    scores, error = _outcome(lambda: tiny_reranker.score(query, documents))
    if error is not None:
        assert str(error).startswith("query") and not _visible(query), str(error)
        return
    assert scores.dtype == np.float32 and scores.shape == (len(documents),)
    assert np.isfinite(scores).all()
    # a document's score depends neither on its neighbours nor on its position
    pairs = tiny_reranker.score_pairs([(query, d) for d in reversed(documents)])
    np.testing.assert_allclose(pairs[::-1], scores, rtol=0, atol=1e-5)
    if documents:
        alone = tiny_reranker.score(query, documents[-1:])
        np.testing.assert_allclose(alone, scores[-1:], rtol=0, atol=1e-5)


@settings(FUZZ, max_examples=20)
@given(documents=st.lists(TEXT, max_size=4), threshold=BAD_THRESHOLD)
def test_a_bad_threshold_is_refused_naming_it(
    tiny_reranker: Reranker, documents: list[str], threshold: Any
) -> None:
    with pytest.raises((TypeError, ValueError), match="threshold"):
        tiny_reranker.rerank("which planet is red", documents, threshold=threshold)


@FUZZ
@given(
    documents=st.one_of(
        st.text(max_size=5),
        st.binary(max_size=5),
        st.none(),
        st.integers(),
        st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
        st.sets(st.text(max_size=2), max_size=2),
    )
)
def test_documents_of_the_wrong_type_are_named(tiny_reranker: Reranker, documents: Any) -> None:
    with pytest.raises(TypeError, match="documents must be a list or tuple"):
        tiny_reranker.rerank("q", documents)
    with pytest.raises(TypeError, match="documents must be a list or tuple"):
        tiny_reranker.score("q", documents)
