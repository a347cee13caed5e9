"""Reranker.predict/rank (sentence-transformers CrossEncoder) and compute_score (FlagReranker)
against the peers themselves on the same tiny model: CPU, fp32, atol 1e-5.

predict/rank are compared with the installed sentence-transformers ``CrossEncoder``;
compute_score with plain transformers logits written from FlagEmbedding's recipe (query
and passage as one pair, raw logit, sigmoid when normalized), an independent reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crossrank import Reranker

st = pytest.importorskip("sentence_transformers")

ATOL = 1e-5
QUERY = "Why is Mars red?"
DOCS = [
    "Mars is known as the Red Planet because of iron oxide on its surface.",
    "Jupiter is the largest planet in the solar system.",
    "火星因表面的氧化铁而被称为红色星球。",
    "",
    "La tour Eiffel se trouve à Paris. " * 12,
    "Der Rhein fließt durch Deutschland und die Schweiz.",
]
PAIRS = [(QUERY, d) for d in DOCS] + [("東京は日本の首都です。", "서울은 대한민국의 수도입니다.")]


@pytest.fixture(scope="module")
def cross_encoder(tiny_model_dir: Path) -> Any:
    return st.CrossEncoder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir: Path) -> np.ndarray:
    """Raw logits of PAIRS from plain transformers, one pair at a time (no padding), tokenized
    as FlagReranker does: query (cut to 3/4 of max_length) and passage without special
    tokens, the passage cut to the room left, joined in XLM-R's pair format
    ``<s> query </s></s> passage </s>``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    out = []
    with torch.inference_mode():
        for query, doc in PAIRS:
            q = tokenizer(query, add_special_tokens=False, max_length=384, truncation=True)
            d = tokenizer(doc, add_special_tokens=False, max_length=512, truncation=True)
            room = 512 - len(q["input_ids"]) - 4
            cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
            ids = torch.tensor([[cls, *q["input_ids"], sep, sep, *d["input_ids"][:room], sep]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            out.append(logits.view(-1).float().item())
    return np.array(out)


def test_predict_equals_cross_encoder(tiny_reranker: Reranker, cross_encoder: Any) -> None:
    want = cross_encoder.predict(PAIRS)
    got = tiny_reranker.predict(PAIRS)
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert ((got > 0) & (got < 1)).all()  # sigmoid: the default for a one-logit model
    # batch_size is accepted and changes nothing; the pairs may be lists or a numpy array
    np.testing.assert_allclose(
        tiny_reranker.predict(np.array([list(p) for p in PAIRS]), batch_size=1), want, atol=ATOL
    )
    np.testing.assert_allclose(tiny_reranker.predict(sentences=PAIRS), want, atol=ATOL)


def test_predict_activation_and_return_types(tiny_reranker: Reranker, cross_encoder: Any) -> None:
    identity = torch.nn.Identity()
    raw = tiny_reranker.predict(PAIRS, activation_fn=identity)
    np.testing.assert_allclose(raw, cross_encoder.predict(PAIRS, activation_fn=identity), atol=ATOL)
    assert (raw < 0).any() or (raw > 1).any()  # logits, not probabilities
    for kwargs in ({"convert_to_tensor": True}, {"convert_to_numpy": False}, {}):
        got, want = tiny_reranker.predict(PAIRS, **kwargs), cross_encoder.predict(PAIRS, **kwargs)
        assert type(got) is type(want)
        if isinstance(want, list):
            assert [type(x) for x in got] == [type(x) for x in want]
            got, want = torch.stack(got), torch.stack(want)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL)
        single, single_want = (
            m.predict(list(PAIRS[0]), **kwargs) for m in (tiny_reranker, cross_encoder)
        )
        assert type(single) is type(single_want)
        assert float(single) == pytest.approx(float(single_want), abs=ATOL)
    empty, empty_want = tiny_reranker.predict([]), cross_encoder.predict([])
    assert type(empty) is type(empty_want) and empty.shape == empty_want.shape == (0,)


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"return_documents": True, "top_k": 10}])
def test_rank_equals_cross_encoder(
    tiny_reranker: Reranker, cross_encoder: Any, kwargs: dict[str, Any]
) -> None:
    want = cross_encoder.rank(QUERY, DOCS, **kwargs)
    got = tiny_reranker.rank(QUERY, DOCS, **kwargs)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=ATOL)
    assert [r.keys() for r in got] == [r.keys() for r in want]
    assert all(type(r["score"]) is float for r in got)
    if "text" in want[0]:
        assert [r["text"] for r in got] == [r["text"] for r in want]


def test_compute_score_equals_transformers_logits(
    tiny_reranker: Reranker, reference_logits: np.ndarray
) -> None:
    scores = tiny_reranker.compute_score([list(p) for p in PAIRS])
    assert type(scores) is list and all(type(s) is float for s in scores)
    np.testing.assert_allclose(scores, reference_logits, atol=ATOL, rtol=0)
    normalized = tiny_reranker.compute_score(PAIRS, normalize=True, batch_size=2)
    np.testing.assert_allclose(normalized, 1 / (1 + np.exp(-reference_logits)), atol=ATOL)
    single = tiny_reranker.compute_score(["Why is Mars red?", DOCS[0]])
    assert type(single) is float and single == pytest.approx(reference_logits[0], abs=ATOL)
    one_in_a_list = tiny_reranker.compute_score([PAIRS[0]])
    assert one_in_a_list == pytest.approx([reference_logits[0]], abs=ATOL)
    assert tiny_reranker.compute_score(PAIRS, max_length=512) == pytest.approx(scores)


def test_refused_arguments_say_what_to_do(tiny_reranker: Reranker) -> None:
    with pytest.raises(ValueError, match=r"Reranker\(model, max_length=256\)"):
        tiny_reranker.compute_score(PAIRS, max_length=256)
    with pytest.raises(ValueError, match=r"device=.*Reranker\(model, device=...\)"):
        tiny_reranker.predict(PAIRS, device="cuda")
    with pytest.raises(ValueError, match=r"prompt_name=.*instruction into the query"):
        tiny_reranker.rank(QUERY, DOCS, prompt_name="query")
    # an encoder has no instruction; sentence-transformers would prepend prompt to the query
    with pytest.raises(ValueError, match=r"prompt='task: '.*prepends the prompt to the query"):
        tiny_reranker.predict(PAIRS, prompt="task: ")
    with pytest.raises(ValueError, match=r"prompt='task: '.*encoder cross-encoder"):
        tiny_reranker.compute_score(PAIRS, prompt="task: ")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny_reranker.predict(PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        tiny_reranker.rank(QUERY, DOCS, top_k=0)
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a \(query, document\) pair"):
        tiny_reranker.predict([PAIRS[0], ("only one",)])


def test_activation_named_by_the_model_is_honoured(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model whose config.json names Identity (as the ms-marco cross-encoders on the Hub
    do) predicts raw logits, here and in CrossEncoder."""
    for entry in os.listdir(tiny_model_dir):
        if entry != "config.json":
            (tmp_path / entry).symlink_to(tiny_model_dir / entry)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    want = st.CrossEncoder(str(tmp_path), device="cpu").predict(PAIRS)
    got = Reranker(str(tmp_path), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert (got < 0).any() or (got > 1).any()
