"""Engine pieces the server relies on: per-call document cap, untruncated token counts, the
raw async path with its token count (ascore_raw), and the queue limit set through batcher()."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from crossrank import Reranker
from crossrank.batching import QueueFullError
from crossrank.result import sigmoid

QUERY = "Which planet is known as the red planet?"
DOCS = [
    "Mars is called the red planet because iron oxide covers its surface. " * 3,
    "Jupiter is the largest planet of the solar system and has a great red spot. " * 2,
    "short",
]


def _reference_logits(reranker, query: str, docs: list[str], max_doc_tokens: int) -> np.ndarray:
    """Plain transformers: a pair budget of query + specials + ``max_doc_tokens`` cuts each
    document to exactly that many tokens (``truncation="only_second"``)."""
    tok = reranker.tokenizer.tokenizer
    budget = (
        len(tok(query, add_special_tokens=False)["input_ids"])
        + tok.num_special_tokens_to_add(pair=True)
        + max_doc_tokens
    )
    enc = tok(
        [query] * len(docs),
        docs,
        truncation="only_second",
        max_length=budget,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    with torch.inference_mode():
        return reranker.model(**enc).logits[:, 0].float().numpy()


def test_max_doc_tokens_matches_a_plain_transformers_cut(tiny_reranker):
    cap = 7
    got = tiny_reranker.score(QUERY, DOCS, normalize=False, max_doc_tokens=cap)
    want = _reference_logits(tiny_reranker, QUERY, DOCS, cap)
    np.testing.assert_allclose(got, want, atol=1e-4)
    full = tiny_reranker.score(QUERY, DOCS, normalize=False)
    assert not np.allclose(got[:2], full[:2])  # the cut changed the long documents
    assert got[2] == pytest.approx(full[2], abs=1e-5)  # and not the short one


def test_max_doc_tokens_is_validated(tiny_reranker):
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_doc_tokens"):
            tiny_reranker.score(QUERY, DOCS, max_doc_tokens=bad)


def test_token_counts_are_untruncated(tiny_reranker):
    tok = tiny_reranker.tokenizer
    long_doc = "planet " * (tok.max_length * 2)
    counts = tok.token_counts([QUERY, long_doc, ""])
    want = [len(tok.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (QUERY, long_doc)]
    assert counts.tolist() == [*want, 0]
    assert counts[1] > tok.max_length


async def test_ascore_raw_returns_raw_scores_and_tokens(tiny_reranker):
    raw, tokens = await tiny_reranker.ascore_raw(QUERY, DOCS, max_doc_tokens=9)
    want = tiny_reranker.score(QUERY, DOCS, normalize=False, max_doc_tokens=9)
    np.testing.assert_allclose(raw, want, atol=1e-5)
    capped = tiny_reranker.tokenizer.cap_documents(DOCS, 9)
    assert tokens == tiny_reranker.encode([QUERY] * len(DOCS), capped).total_tokens
    probs = await tiny_reranker.ascore(QUERY, DOCS, max_doc_tokens=9)
    np.testing.assert_allclose(probs, sigmoid(raw), atol=1e-6)


async def test_score_cache_is_keyed_by_the_cut_document(tiny_model_dir, tiny_reranker):
    cached = Reranker(str(tiny_model_dir), device="cpu", cache="memory")
    try:
        full, tokens = await cached.ascore_raw(QUERY, DOCS)
        assert tokens > 0
        again, tokens = await cached.ascore_raw(QUERY, DOCS)
        assert tokens == 0  # every pair came from the cache
        np.testing.assert_array_equal(again, full)
        cut, tokens = await cached.ascore_raw(QUERY, DOCS, max_doc_tokens=5)
        assert tokens > 0  # the long documents, cut, are new pairs
        np.testing.assert_allclose(
            cut, tiny_reranker.score(QUERY, DOCS, normalize=False, max_doc_tokens=5), atol=1e-5
        )
        assert not np.allclose(cut[:2], full[:2])
    finally:
        cached.close()


async def test_batcher_limit_is_set_on_the_existing_queue(tiny_reranker):
    batcher = tiny_reranker.batcher()
    assert tiny_reranker.batcher(max_pending_pairs=2) is batcher
    assert batcher.max_pending_pairs == 2
    encoded = tiny_reranker.encode([QUERY] * 3, DOCS)
    with pytest.raises(QueueFullError, match="limit 2"):
        await batcher.submit(encoded)
    batcher.max_pending_pairs = None
    assert len(await asyncio.wait_for(batcher.submit(encoded), 60)) == 3
