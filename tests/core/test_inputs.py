"""Bad and unusual input: clear errors naming the item, or a correct result; never a shifted index."""

from __future__ import annotations

import numpy as np
import pytest

from crossrank import Reranker
from crossrank.validation import scrub_surrogates


@pytest.mark.parametrize("query", [None, 3, b"bytes", ["list"]])
def test_query_of_wrong_type_is_a_type_error(tiny_reranker: Reranker, query: object) -> None:
    with pytest.raises(TypeError, match="query must be a str"):
        tiny_reranker.score(query, ["doc"])  # type: ignore[arg-type]


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_query_is_a_value_error(tiny_reranker: Reranker, query: str) -> None:
    with pytest.raises(ValueError, match="query must not be empty"):
        tiny_reranker.rerank(query, ["doc"])


def test_documents_must_be_a_list_of_str_naming_the_first_bad_index(
    tiny_reranker: Reranker,
) -> None:
    with pytest.raises(TypeError, match=r"documents\[2\] must be a str, got int"):
        tiny_reranker.score("q", ["a", "b", 3, None])
    with pytest.raises(TypeError, match="list or tuple of str, got str"):
        tiny_reranker.score("q", "a single string")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got generator"):
        tiny_reranker.score("q", (d for d in ["a"]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pairs\[1\]\[1\] must be a str"):
        tiny_reranker.score_pairs([("q", "d"), ("q", 5)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"pairs\[0\]\[0\] must not be empty"):
        tiny_reranker.score_pairs([(" ", "d")])
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(query, document\) pair"):
        tiny_reranker.score_pairs([("q", "d", "extra")])  # type: ignore[list-item]


def test_empty_documents_give_an_empty_result_without_a_model_call(
    tiny_reranker: Reranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: object) -> None:
        raise AssertionError("the model must not be called")

    monkeypatch.setattr(tiny_reranker.runner, "submit", boom)
    assert tiny_reranker.score("q", []).shape == (0,)
    assert tiny_reranker.score("q", ()).dtype == np.float32
    assert tiny_reranker.rerank("q", []) == []
    assert tiny_reranker.score_pairs([]).shape == (0,)


@pytest.mark.parametrize("top_n", [0, -1, 2.5, "3", True])
def test_bad_top_n_is_a_value_error(tiny_reranker: Reranker, top_n: object) -> None:
    with pytest.raises(ValueError, match="top_n"):
        tiny_reranker.rerank("q", ["a"], top_n=top_n)  # type: ignore[arg-type]


def test_unusual_text_keeps_index_alignment(tiny_reranker: Reranker) -> None:
    docs = [
        "plain",
        "",
        "lone surrogate \ud800 here",
        "control \x01\x02\x1b[31m chars",
        "nul \x00 byte",
        "emoji 😀👩\u200d👩\u200d👧 and flags 🇫🇷",
        "mixed 中文 English 日本語 한국어 العربية русский",
        "x" * 1_000_000,
        "   ",
        "plain",
    ]
    scores = tiny_reranker.score("a query", docs)
    assert scores.shape == (len(docs),) and np.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[-1], abs=1e-6)  # same text, same score
    # each document scores as it does alone: nothing shifted
    for i in (1, 2, 4, 5, 7, 8):
        assert scores[i] == pytest.approx(tiny_reranker.score("a query", [docs[i]])[0], abs=1e-5)
    # a lone surrogate is scored as U+FFFD, and the result returns the caller's own string
    results = tiny_reranker.rerank("a query", docs)
    assert sorted(r.index for r in results) == list(range(len(docs)))
    assert {r.index: r.document for r in results}[2] is docs[2]
    assert scores[2] == pytest.approx(
        tiny_reranker.score("a query", ["lone surrogate \ufffd here"])[0], abs=1e-6
    )


def test_constructor_rejects_bad_options(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="max_length"):
        Reranker(str(tiny_model_dir), max_length=4)
    with pytest.raises(ValueError, match="query_max_length"):
        Reranker(str(tiny_model_dir), max_length=64, query_max_length=64)
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        Reranker(str(tiny_model_dir), max_length=100_000)
    with pytest.raises(ValueError, match="dtype"):
        Reranker(str(tiny_model_dir), dtype="float8")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Reranker(str(tiny_model_dir), device="cuda:1")


def test_scrub_surrogates_replaces_each_lone_surrogate_in_place() -> None:
    texts = ["plain", "é\ud800x", "火星\udfff\ud800", "no surrogate: 火星 😀", ""]
    scrubbed = scrub_surrogates(texts)
    assert scrubbed == ["plain", "é\ufffdx", "火星\ufffd\ufffd", "no surrogate: 火星 😀", ""]
    assert [len(t) for t in scrubbed] == [len(t) for t in texts]  # offsets unchanged
    assert texts[1] == "é\ud800x"  # the caller's list is not changed
