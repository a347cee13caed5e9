"""Concurrent tokenization: calls that need different truncation settings never wait for
each other (each setting has a view of the shared tokenizer), views encode exactly as the
tokenizer does, and a call is split only over the cores that are spare."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from crossrank import tokenization
from crossrank.tokenization import PairTokenizer, _SharedBackend, split_call

TEXTS = [
    ("Where is <mask> kept?", "The <s>odd</s> <pad> text ｆｕｌｌ　ｗｉｄｔｈ " * 30),
    ("控制\x07字符", "日本語のテキスト、句読点。" * 40),
    ("<unk>", "  spaced   words\tand\nlines " * 50),
]


@pytest.fixture(scope="module")
def hf_tokenizer(real_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


def test_two_settings_are_in_use_at_once_and_encode_as_the_tokenizer(hf_tokenizer) -> None:
    shared = _SharedBackend(hf_tokenizer.backend_tokenizer, "right")
    assert shared._build() is not None  # a view reproduces this tokenizer (no fallback lock)
    queries, docs = [q for q, _ in TEXTS], [d for _, d in TEXTS]
    # nested on one thread: a setting that had to wait for the other would never enter
    with shared.using(None) as plain, shared.using((48, 0)) as truncated:
        assert plain is not truncated
        whole = [e.ids for e in plain.encode_batch(docs, add_special_tokens=False)]
        cut = [e.ids for e in truncated.encode_batch(list(zip(queries, docs, strict=True)))]
    assert whole == [
        hf_tokenizer(d, add_special_tokens=False, truncation=False)["input_ids"] for d in docs
    ]
    want = hf_tokenizer(queries, docs, truncation="only_second", max_length=48)["input_ids"]
    assert cut == want
    assert all(len(ids) == 48 for ids in cut)


def test_without_an_exact_view_one_lock_serves_every_setting(
    hf_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_SharedBackend, "_build", lambda self: None)
    pairs = PairTokenizer(hf_tokenizer, max_length=48, query_max_length=16)
    queries, docs = [q for q, _ in TEXTS], [d for _, d in TEXTS]
    encoded = pairs.encode(queries, docs)  # query caps (no truncation), then pairs (48, 0)
    capped = pairs.cap_queries(queries)
    want = hf_tokenizer(capped, docs, truncation="only_second", max_length=48)["input_ids"]
    spans = zip(encoded.offsets, encoded.lengths, strict=True)
    got = [encoded.ids[o : o + n].tolist() for o, n in spans]
    assert got == want
    hf_tokenizer.backend_tokenizer.no_truncation()  # the fallback sets the caller's tokenizer


def test_the_callers_tokenizer_is_never_changed(hf_tokenizer) -> None:
    backend = hf_tokenizer.backend_tokenizer
    backend.enable_truncation(300)  # as a transformers call may leave it
    before = (backend.truncation, backend.padding)
    pairs = PairTokenizer(hf_tokenizer, max_length=64, query_max_length=24)
    pairs.encode([q for q, _ in TEXTS], [d for _, d in TEXTS])
    pairs.token_counts([d for _, d in TEXTS])
    assert (backend.truncation, backend.padding) == before
    backend.no_truncation()


def test_a_call_is_split_only_over_spare_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # crossrank's threads do the split
    monkeypatch.setattr(tokenization, "tokenizer_threads", lambda: 3)
    monkeypatch.setattr(tokenization, "_pool", None)  # a pool of the size above
    monkeypatch.setattr(tokenization, "_queued", 0)

    def where(lo: int, hi: int) -> int:
        return threading.get_ident()

    me = threading.get_ident()
    lone = split_call(where, 200)
    assert len(lone) == 3 and lone[0] == me and me not in lone[1:]  # a large call: every thread
    release = threading.Event()
    pool = tokenization._executor()
    blockers = [tokenization._offload(pool, lambda lo, hi: release.wait(), 0, 0) for _ in range(2)]
    try:
        busy = split_call(where, 600)  # no core is spare
        assert busy == [me] * len(busy) and len(busy) == 3  # chunks of at most 256 pairs
    finally:
        release.set()
        for blocker in blockers:
            blocker.result()
    assert tokenization._queued == 0
    pool.shutdown()
