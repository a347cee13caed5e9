"""Engine behaviour: parity with a plain transformers forward, batching, order, async."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from crossrank import Reranker, RerankResult
from crossrank.batching import batch_cost, plan_batches
from crossrank.testing import TINY_CONFIG, build_random_reranker
from crossrank.tokenization import tokenizer_threads


@functools.cache
def _reference_model(model_dir: Path) -> tuple:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    return tokenizer, model


def reference_scores(
    model_dir: Path, pairs: list[tuple[str, str]], max_length: int = 512
) -> np.ndarray:
    """Independent reference: each pair tokenized alone, no padding, fp32, plain HF forward.

    ``tokenizer(q, "")`` silently encodes the query alone; crossrank scores an empty document
    as the pair (query, empty), so the reference asks the Rust tokenizer for that pair directly.
    """
    tokenizer, model = _reference_model(model_dir)
    out = []
    with torch.no_grad():
        for query, doc in pairs:
            if doc:
                enc = tokenizer(
                    query, doc, truncation="only_second", max_length=max_length, return_tensors="pt"
                )
            else:
                ids = torch.tensor([tokenizer.backend_tokenizer.encode(query, "").ids])
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            logits = model(**enc).logits[0].double()
            if logits.shape[0] == 2:
                out.append(torch.softmax(logits, -1)[1].item())
            else:
                out.append(torch.sigmoid(logits[0]).item())
    return np.array(out)


def test_scores_match_independent_reference_on_shuffled_multilingual_input(
    tiny_reranker: Reranker, tiny_model_dir: Path, xquad: dict
) -> None:
    items = xquad["questions"][:24]
    rng = random.Random(1)
    pairs = [(it["question"], items[rng.randrange(len(items))]["context"]) for it in items]
    pairs += [("短い質問", "x"), ("query", "")]  # very short and empty documents
    rng.shuffle(pairs)
    got = tiny_reranker.score_pairs(pairs)
    assert got.dtype == np.float32 and got.shape == (len(pairs),)
    np.testing.assert_allclose(got, reference_scores(tiny_model_dir, pairs), atol=1e-4)
    # and through the single-query API
    query = items[0]["question"]
    docs = [it["context"] for it in items[:10]]
    expected = reference_scores(tiny_model_dir, [(query, d) for d in docs])
    np.testing.assert_allclose(tiny_reranker.score(query, docs), expected, atol=1e-4)


def test_two_label_models_use_softmax_of_positive_label(skeleton_dir: Path, tmp_path: Path) -> None:
    model_dir = build_random_reranker(tmp_path / "two", skeleton_dir, num_labels=2, **TINY_CONFIG)
    rr = Reranker(str(model_dir), device="cpu")
    pairs = [("what is red", "Mars is red"), ("what is red", "grass is green"), ("a", "b")]
    np.testing.assert_allclose(rr.score_pairs(pairs), reference_scores(model_dir, pairs), atol=1e-4)
    raw = rr.score_pairs(pairs, normalize=False)
    np.testing.assert_allclose(
        1 / (1 + np.exp(-raw.astype(np.float64))), rr.score_pairs(pairs), atol=1e-6
    )


def test_raw_logits_when_normalize_false(tiny_model_dir: Path) -> None:
    rr = Reranker(str(tiny_model_dir), device="cpu", normalize=False)
    docs = ["Mars is red", "grass is green", "x" * 300]
    raw = rr.score("what is red", docs)
    tok, model = _reference_model(tiny_model_dir)
    with torch.no_grad():
        ref = [
            model(**tok("what is red", d, return_tensors="pt")).logits[0, 0].item() for d in docs
        ]
    np.testing.assert_allclose(raw, ref, atol=1e-4)
    assert (
        not ((raw >= 0) & (raw <= 1)).all() or np.abs(raw).max() > 0
    )  # raw logits, not probabilities
    assert rr.score("what is red", docs, normalize=True) == pytest.approx(
        1 / (1 + np.exp(-raw)), abs=1e-6
    )


def test_equal_inputs_give_equal_scores_whatever_else_is_in_the_batch(
    tiny_reranker: Reranker, xquad: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    rr = tiny_reranker
    monkeypatch.setattr(rr, "batch_tokens", 2048)
    query, doc = "Where is the Eiffel tower?", "La tour Eiffel se trouve à Paris."
    alone = rr.score(query, [doc])[0]
    others = [it["context"] for it in xquad["questions"][:20]]
    mixed = rr.score(query, [*others[:7], doc, *others[7:], doc])
    assert mixed[7] == pytest.approx(alone, abs=1e-5)
    assert mixed[-1] == pytest.approx(alone, abs=1e-5)


def test_batches_respect_the_token_budget_and_cover_every_pair() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=1000)
    for packed in (False, True):
        batches = plan_batches(lengths, 4096, packed=packed)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(1000))
        for rows in batches:
            assert batch_cost(lengths[rows], packed=packed) <= 4096
            assert (np.diff(lengths[rows]) <= 0).all()  # length-sorted, longest first
    # a pair longer than the budget still gets a batch of its own
    assert [b.tolist() for b in plan_batches(np.array([5000, 10]), 4096)] == [[0], [1]]


def test_batched_scoring_restores_input_order(
    tiny_reranker: Reranker, xquad: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [
        it["context"][: random.Random(i).randrange(5, 600)]
        for i, it in enumerate(xquad["questions"][:40])
    ]
    query = "When was it built?"
    monkeypatch.setattr(tiny_reranker, "batch_tokens", 100_000)  # one batch
    one_pass = tiny_reranker.score(query, docs)
    one_by_one = np.array([tiny_reranker.score(query, [d])[0] for d in docs[:8]])
    monkeypatch.setattr(tiny_reranker, "batch_tokens", 600)  # many tiny batches
    np.testing.assert_allclose(tiny_reranker.score(query, docs), one_pass, atol=1e-5)
    np.testing.assert_allclose(one_pass[:8], one_by_one, atol=1e-5)


def test_rerank_returns_results_best_first_with_indices(tiny_reranker: Reranker) -> None:
    docs = ["alpha", "beta gamma", "", "δέλτα", "epsilon zeta eta"]
    scores = tiny_reranker.score("greek letters", docs)
    results = tiny_reranker.rerank("greek letters", docs, top_n=3)
    assert [r.index for r in results] == list(np.argsort(-scores, kind="stable")[:3])
    for r in results:
        assert isinstance(r, RerankResult) and type(r.score) is float
        assert r.document == docs[r.index] and r.score == pytest.approx(float(scores[r.index]))
    assert len(tiny_reranker.rerank("greek letters", docs, top_n=50)) == len(docs)
    assert len(tiny_reranker.rerank("greek letters", docs)) == len(docs)
    cut = float(np.median(scores))
    kept = tiny_reranker.rerank("greek letters", docs, threshold=cut)
    assert {r.index for r in kept} == {i for i, s in enumerate(scores) if s >= cut}
    assert len(tiny_reranker.rerank("greek letters", docs, top_n=1, threshold=cut)) == 1
    with pytest.raises(AttributeError):
        results[0].score = 1.0  # type: ignore[misc]


def test_thread_safety(tiny_reranker: Reranker, xquad: dict) -> None:
    items = xquad["questions"][:16]
    jobs = [
        (it["question"], [o["context"][:300] for o in items[i % 4 :: 3]])
        for i, it in enumerate(items)
    ]
    expected = [tiny_reranker.score(q, d) for q, d in jobs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = tiny_reranker.score(*jobs[i])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, exp in enumerate(expected):
        np.testing.assert_allclose(results[i], exp, atol=1e-5)


def test_cuda_oom_splits_the_failing_batch_and_never_recomputes_successes(
    tiny_reranker: Reranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    rr = tiny_reranker
    monkeypatch.setattr(rr, "batch_tokens", 100_000)
    docs = [f"document number {i} " * (1 + i % 7) for i in range(16)]
    expected = rr.score("query", docs)
    real_submit = rr.runner.submit
    seen: list[int] = []

    def flaky(encoded):  # fails when more than 4 pairs are in one pass
        seen.append(len(encoded))
        if len(encoded) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_submit(encoded)

    monkeypatch.setattr(rr.runner, "submit", flaky)
    np.testing.assert_allclose(rr.score("query", docs), expected, atol=1e-5)
    assert seen == [16, 8, 4, 4, 8, 4, 4]  # only failing passes are split; each success runs once
    assert sum(n for n in seen if n <= 4) == len(docs)

    monkeypatch.setattr(
        rr.runner, "submit", lambda enc: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x"))
    )
    with pytest.raises(RuntimeError, match="single pair"):
        rr.score("query", ["one"])


def test_weights_load_in_target_dtype_in_eval_mode(
    tiny_model_dir: Path, tiny_reranker: Reranker
) -> None:
    rr = Reranker(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in rr.model.parameters()} == {torch.bfloat16}
    assert not rr.model.training
    scores = rr.score("q", ["a", "b"])
    assert scores.dtype == np.float32
    fp32 = tiny_reranker
    assert fp32.dtype == torch.float32 and {p.dtype for p in fp32.model.parameters()} == {
        torch.float32
    }
    np.testing.assert_allclose(scores, fp32.score("q", ["a", "b"]), atol=2e-2)


def test_forward_runs_in_inference_mode(tiny_reranker: Reranker) -> None:
    modes: list[bool] = []
    handle = tiny_reranker.model.register_forward_hook(
        lambda *_: modes.append(torch.is_inference_mode_enabled())
    )
    try:
        tiny_reranker.score("q", ["d"])
    finally:
        handle.remove()
    assert modes == [True]


def test_tokenizer_called_once_for_query_cap_and_once_for_all_pairs(
    tiny_reranker: Reranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    rr = tiny_reranker
    calls: list[int] = []
    capped = rr.tokenizer._capped

    def counting(queries: list[str]):
        calls.append(len(set(queries)))
        return capped(queries)

    pair_calls: list[int] = []
    encode_pairs = rr.tokenizer._encode_pairs

    def counting_pairs(queries: list[str], documents: list[str], *rest):
        pair_calls.append(len(documents))
        return encode_pairs(queries, documents, *rest)

    monkeypatch.setattr(rr.tokenizer, "_capped", counting)
    monkeypatch.setattr(rr.tokenizer, "_encode_pairs", counting_pairs)
    rr.score("one query", [f"doc {i}" for i in range(50)])
    assert sum(calls) == 1  # the one distinct query, tokenized once for its cap
    # every pair in batched Rust calls: one per chunk of crossrank's own tokenizer threads
    assert sum(pair_calls) == 50 and len(pair_calls) <= tokenizer_threads()


async def test_async_api_matches_sync_and_does_not_block_the_loop(
    tiny_reranker: Reranker, xquad: dict
) -> None:
    docs = [it["context"] for it in xquad["questions"][:30]]
    query = "Who wrote it?"
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    tick_task = asyncio.create_task(ticker())
    scores, results = await asyncio.gather(
        tiny_reranker.ascore(query, docs), tiny_reranker.arerank(query, docs, top_n=4)
    )
    stop.set()
    await tick_task
    assert ticks > 3  # the loop kept running while the model worked
    np.testing.assert_allclose(scores, tiny_reranker.score(query, docs), atol=1e-5)
    assert [r.index for r in results] == list(np.argsort(-scores, kind="stable")[:4])
    pairs = [(query, d) for d in docs[:5]]
    np.testing.assert_allclose(
        await tiny_reranker.ascore_pairs(pairs), tiny_reranker.score_pairs(pairs), atol=1e-5
    )
    assert (await tiny_reranker.ascore(query, [])).shape == (0,)


async def test_concurrent_async_calls_share_forward_passes(
    tiny_reranker: Reranker, xquad: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    rr = tiny_reranker
    passes: list[int] = []
    unsubscribe = rr.subscribe(lambda pairs, tokens: passes.append(pairs))
    jobs = [
        (it["question"], [o["context"][:200] for o in xquad["questions"][i : i + 5]])
        for i, it in enumerate(xquad["questions"][:12])
    ]
    try:
        got = await asyncio.gather(*(rr.ascore(q, d) for q, d in jobs))
    finally:
        unsubscribe()
    for (q, d), scores in zip(jobs, got, strict=True):
        np.testing.assert_allclose(scores, rr.score(q, d), atol=1e-5)
    assert sum(passes) == sum(len(d) for _, d in jobs)
    assert len(passes) < len(jobs)  # requests were merged into shared passes
