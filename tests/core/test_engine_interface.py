"""The narrow engine interface a server uses (first_overlong, subscribe) and the option
checks that need the model."""

from __future__ import annotations

import asyncio
import pickle
import threading

import numpy as np
import pytest

from crossrank import Reranker
from crossrank.errors import OptionError, OptionTypeError

QUERY = "Which planet is known as the red planet?"


def _pair_tokens(reranker: Reranker, query: str, text: str) -> int:
    """Reference: the untruncated pair length from the Hugging Face tokenizer itself."""
    tok = reranker.tokenizer.tokenizer
    return len(tok(query, text, truncation=False)["input_ids"])


def test_first_overlong_names_the_first_text_that_would_be_cut(tiny_reranker) -> None:
    rr = tiny_reranker
    long_text = "planet " * rr.max_length
    texts = ["short", "Mars is red.", long_text, long_text]
    assert rr.first_overlong(QUERY, texts) == 2
    assert _pair_tokens(rr, QUERY, texts[2]) > rr.max_length  # the reference agrees
    assert rr.first_overlong(QUERY, texts[:2]) is None
    # a text that exactly fills max_length fits; one more token does not
    words = 1
    while _pair_tokens(rr, QUERY, "planet " * (words + 1)) <= rr.max_length:
        words += 1
    assert rr.first_overlong(QUERY, ["planet " * words]) is None
    assert rr.first_overlong(QUERY, ["a", "planet " * (words + 1)]) == 1


def test_first_overlong_refuses_a_query_over_its_limit(tiny_reranker) -> None:
    long_query = "red " * tiny_reranker.query_max_length * 2
    with pytest.raises(ValueError, match=r"^query has more than the limit of \d+ tokens"):
        tiny_reranker.first_overlong(long_query, ["a"])


def test_first_overlong_in_chunk_mode_checks_only_the_query(tiny_model_dir) -> None:
    rr = Reranker(str(tiny_model_dir), device="cpu", long_docs="chunk", max_length=64)
    try:
        assert rr.first_overlong(QUERY, ["planet " * 500]) is None  # windows, never cut
        with pytest.raises(ValueError, match="query"):
            rr.first_overlong("red " * 200, ["a"])
    finally:
        rr.close()


async def test_subscribe_and_unsubscribe(tiny_reranker) -> None:
    first: list[tuple[int, int]] = []
    second: list[int] = []
    stop_first = tiny_reranker.subscribe(lambda pairs, tokens: first.append((pairs, tokens)))
    stop_second = tiny_reranker.subscribe(lambda pairs, tokens: second.append(pairs))
    try:
        await tiny_reranker.ascore(QUERY, ["a", "b", "c"])
        assert sum(p for p, _ in first) == 3 and sum(second) == 3
        assert all(tokens > 0 for _, tokens in first)
        stop_first()
        stop_first()  # a second call is harmless
        await tiny_reranker.ascore(QUERY, ["d"])
        assert sum(p for p, _ in first) == 3  # no longer called
        assert sum(second) == 4
    finally:
        stop_second()
    await tiny_reranker.ascore(QUERY, ["e"])
    assert sum(second) == 4


def test_options_that_need_the_model_name_their_param(tiny_model_dir) -> None:
    with pytest.raises(OptionError, match="exceeds the model's limit") as err:
        Reranker(str(tiny_model_dir), device="cpu", max_length=100_000)
    assert err.value.param == "max_length"
    with pytest.raises(OptionError, match="smaller than the window") as err:
        Reranker(
            str(tiny_model_dir),
            device="cpu",
            max_length=64,
            query_max_length=48,
            long_docs="chunk",
            chunk_overlap=40,
        )
    assert err.value.param == "chunk_overlap"


def chunking_reranker(model_dir) -> Reranker:
    """The packed runner (where overlap applies), chunking 11 pairs into 2, 4 and 5."""
    return Reranker(
        str(model_dir),
        device="cpu",
        fast_path=True,
        overlap_min_pairs=4,
        overlap_first_chunk=2,
        overlap_chunk_pairs=4,
    )


@pytest.mark.parametrize("kind", [OptionError, OptionTypeError])
def test_option_errors_survive_pickling_with_their_param(kind: type[OptionError]) -> None:
    """Ray Serve and multiprocessing pickle an error to hand it to the caller."""
    back = pickle.loads(pickle.dumps(kind("instruction", "instruction must be a str")))
    assert type(back) is kind
    assert back.param == "instruction" and str(back) == "instruction must be a str"


def test_overlap_options_split_tokenization_into_chunks(tiny_model_dir, tiny_reranker) -> None:
    rr = chunking_reranker(tiny_model_dir)
    encoded: list[int] = []
    original = rr.tokenizer.encode

    def counting(queries, documents, **kwargs):
        encoded.append(len(documents))
        return original(queries, documents, **kwargs)

    rr.tokenizer.encode = counting  # type: ignore[method-assign]
    try:
        docs = [f"document {i} about planets " * (1 + i % 3) for i in range(11)]
        got = rr.score(QUERY, docs, normalize=False)
        # 2 first, then up to 4; a tail under half a chunk joins the last one
        assert encoded == [2, 4, 5]
        want = tiny_reranker.score(QUERY, docs, normalize=False)
        np.testing.assert_allclose(got, want, atol=1e-4)
        encoded.clear()
        rr.score(QUERY, docs[:4])  # not more than overlap_min_pairs: one call
        assert encoded == [4]
    finally:
        rr.close()


def test_a_lone_async_call_is_chunked_and_queued_like_the_in_process_call(
    tiny_model_dir, tiny_reranker
) -> None:
    rr = chunking_reranker(tiny_model_dir)
    events: list[tuple[str, int, str]] = []
    encode, worker = rr.tokenizer.encode, rr._devices.workers[0]
    submit = worker.submit

    def encoding(queries, documents, **kwargs):
        events.append(("encode", len(documents), threading.current_thread().name))
        return encode(queries, documents, **kwargs)

    def queueing(encoded):
        events.append(("pass", len(encoded), threading.current_thread().name))
        return submit(encoded)

    rr.tokenizer.encode = encoding  # type: ignore[method-assign]
    worker.submit = queueing  # type: ignore[method-assign]
    try:
        docs = [f"document {i} about planets " * (1 + i % 3) for i in range(11)]
        got, _ = asyncio.run(rr.ascore_raw(QUERY, docs))
        np.testing.assert_allclose(
            got, tiny_reranker.score(QUERY, docs, normalize=False), atol=1e-4
        )
        # the chunks of the synchronous call (2, 4, 5), in order, each queued as one pass by
        # the thread that tokenized it
        encoded = [(n, thread) for kind, n, thread in events if kind == "encode"]
        assert encoded == [(n, thread) for kind, n, thread in events if kind == "pass"]
        assert [n for n, _ in encoded] == [2, 4, 5]
        assert not any(name.startswith("crossrank-forward") for *_, name in events)
    finally:
        rr.close()


def test_a_closed_reranker_refuses_async_calls(tiny_model_dir) -> None:
    rr = Reranker(str(tiny_model_dir), device="cpu")
    assert asyncio.run(rr.ascore(QUERY, ["a", "b"])).shape == (2,)
    rr.close()
    # a lone small call would be queued by the thread that tokenizes it, past every pool
    # close() stops: the engine itself refuses it
    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(rr.ascore(QUERY, ["a", "b"]))


def test_subscribe_is_used_by_the_event_loop_path_only(tiny_reranker) -> None:
    seen: list[int] = []
    stop = tiny_reranker.subscribe(lambda pairs, tokens: seen.append(pairs))
    try:
        tiny_reranker.score(QUERY, ["a", "b"])  # the synchronous path has no queue
        assert seen == []
        asyncio.run(tiny_reranker.ascore(QUERY, ["a", "b"]))
        assert sum(seen) == 2
    finally:
        stop()
