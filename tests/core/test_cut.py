"""Cutting a document before tokenizing gives exactly the tokens of the full text.

The reference is the Hugging Face tokenizer's own pair call on the whole, uncut text
(``truncation="only_second"``, and ``return_overflowing_tokens`` with a ``stride`` for
windows). The cut lands at many places: real XQuAD-R paragraphs (en, zh) under several
``max_length`` values, long synthetic documents in several scripts (CJK without spaces,
Thai, URLs, long numbers, emoji), and texts whose cut falls inside a word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from crossrank.tokenization import (
    EncodedPairs,
    PairTokenizer,
    char_budget,
    encode_cut,
    first_limit,
)

QUERY = "Which river flows through the city?"


@pytest.fixture(scope="module")
def hf_tokenizer(real_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


@pytest.fixture(scope="module")
def paragraphs(shared: Path | None) -> list[str]:
    """Every distinct XQuAD-R paragraph, English and Chinese."""
    if shared is None or not (shared / "data/xquad-r/en.json").exists():
        pytest.skip("XQuAD-R is absent from ../shared")
    texts: list[str] = []
    for lang in ("en", "zh"):
        data = json.loads((shared / f"data/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        texts += [p["context"] for a in data["data"] for p in a["paragraphs"]]
    return list(dict.fromkeys(texts))


def synthetic_documents(paragraphs: list[str]) -> list[str]:
    rng = random.Random(7)
    zh = [p for p in paragraphs if not p.isascii()]
    en = [p for p in paragraphs if p.isascii()]
    thai = "ภาษาไทยเป็นภาษาที่มีผู้พูดมากกว่ายี่สิบล้านคนแม่น้ำเจ้าพระยาไหลผ่านกรุงเทพมหานคร"
    digits = "".join(rng.choice("0123456789") for _ in range(20_000))
    url = "https://example.com/" + "/".join(
        f"path{rng.randint(0, 10**6)}?q=a&b=c" for _ in range(900)
    )
    kana = "とうきょうはにほんのしゅとであり、すみだがわがしないをながれています。"
    japanese = "東京は日本の首都であり、隅田川が市内を流れています。"  # sparser than Chinese
    hangul = "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐릅니다. "
    return [
        "".join(zh[:40]).replace(" ", ""),  # CJK, no spaces at all
        kana * 150,
        japanese * 200,
        hangul * 150,
        en[0][:300] + "".join(zh[:30]),  # the cut counts dense characters from a point on
        "".join(zh[:3]) + " ".join(en[:20]),  # ... up to a point
        ("x" + " " * 9) * 3000,  # ten characters a token: the first cut is too short
        "internationalization " * 3000,  # the same, in words
        thai * 200,
        digits,
        "1234567890" * 3000,
        "0" * 30_000,
        url,
        " ".join(en[:30]),
        "supercalifragilistic" * 3000,  # one word, the cut always inside it
        "😀🚀 " * 4000,  # fewer characters than tokens
        "ab" * 40 + " " + "x" * 5000,
        "Ünïcödé naïve café " * 2000,
    ]


def rows(enc: EncodedPairs) -> list[list[int]]:
    return [enc.ids[o : o + n].tolist() for o, n in zip(enc.offsets, enc.lengths, strict=True)]


@pytest.mark.parametrize("max_length", [40, 64, 128, 512])
def test_truncated_pairs_equal_the_full_text_pair_call(hf_tokenizer, paragraphs, max_length):
    joined = [" ".join(paragraphs[i : i + 8]) for i in range(0, len(paragraphs), 8)]
    docs = paragraphs + joined + synthetic_documents(paragraphs)
    encoder = PairTokenizer(hf_tokenizer, max_length=max_length, query_max_length=16)
    got = rows(encoder.encode([QUERY] * len(docs), docs))
    want = hf_tokenizer([QUERY] * len(docs), docs, truncation="only_second", max_length=max_length)[
        "input_ids"
    ]
    cut = sum(len(d) > char_budget(max_length) for d in docs)
    assert cut > 30  # the cut really happens, for many documents
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"document {i} differs: {docs[i][:60]!r}"


def test_cut_inside_words_at_every_offset(hf_tokenizer, paragraphs) -> None:
    """Shift a long text one character at a time so the cut lands at every place of a word."""
    base = " ".join(p for p in paragraphs if p.isascii())[:20_000]
    docs = [base[k:] for k in range(0, 80)] + ["x" * k + base for k in range(1, 40)]
    encoder = PairTokenizer(hf_tokenizer, max_length=96, query_max_length=16)
    got = rows(encoder.encode([QUERY] * len(docs), docs))
    want = hf_tokenizer([QUERY] * len(docs), docs, truncation="only_second", max_length=96)
    assert got == want["input_ids"]


@pytest.mark.parametrize(("max_length", "overlap", "max_windows"), [(64, 8, 3), (128, 0, 5)])
def test_windows_and_spans_equal_the_full_text_windows(
    hf_tokenizer, paragraphs, max_length, overlap, max_windows
):
    docs = [" ".join(paragraphs[i : i + 6]) for i in range(0, len(paragraphs), 6)]
    docs += synthetic_documents(paragraphs)
    encoder = PairTokenizer(hf_tokenizer, max_length=max_length, query_max_length=16)
    got = encoder.encode_windows(
        [QUERY] * len(docs), docs, window_tokens=None, overlap=overlap, max_windows=max_windows
    )
    full = hf_tokenizer(
        [QUERY] * len(docs),
        docs,
        truncation="only_second",
        max_length=max_length,
        stride=overlap,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample = np.asarray(full["overflow_to_sample_mapping"])
    keep = np.concatenate([np.flatnonzero(sample == i)[:max_windows] for i in range(len(docs))])
    assert got.pair_index is not None and got.spans is not None
    assert got.pair_index.tolist() == sample[keep].tolist()
    assert rows(got) == [full["input_ids"][k] for k in keep]
    for row, k in enumerate(keep):
        seq = full.sequence_ids(int(k))
        doc = [full["offset_mapping"][k][t] for t, s in enumerate(seq) if s == 1]
        assert tuple(got.spans[row]) == ((doc[0][0], doc[-1][1]) if doc else (0, 0))
    assert (np.bincount(sample)[: len(docs)] > max_windows).sum() > len(docs) // 2


def test_caps_and_counts_equal_the_full_text(hf_tokenizer, paragraphs) -> None:
    docs = synthetic_documents(paragraphs) + paragraphs[::7]
    encoder = PairTokenizer(hf_tokenizer, max_length=128, query_max_length=32)
    full = hf_tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)
    capped = encoder.cap_documents(docs, 50)
    for doc, ids, offsets, got in zip(
        docs, full["input_ids"], full["offset_mapping"], capped, strict=True
    ):
        assert got == (doc[: offsets[49][1]] if len(ids) > 50 else doc)
    counts = encoder.token_counts(docs, at_most=100)
    exact = np.array([len(ids) for ids in full["input_ids"]])
    assert ((counts == exact) | ((counts > 100) & (exact > 100))).all()
    assert (counts[exact > 100] > 100).all()
    assert encoder.token_counts(docs).tolist() == exact.tolist()


def test_lone_surrogates_in_dense_text_are_scrubbed_after_the_cut(hf_tokenizer, paragraphs):
    zh = "".join(p for p in paragraphs if not p.isascii())
    docs = [zh[:300] + "\ud800" + zh[300:20_000], zh[:20_000] + "\udfff"]
    encoder = PairTokenizer(hf_tokenizer, max_length=128, query_max_length=16)
    got = rows(encoder.encode([QUERY] * len(docs), docs))
    clean = [d.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd") for d in docs]
    want = hf_tokenizer([QUERY] * 2, clean, truncation="only_second", max_length=128)
    assert got == want["input_ids"]


def test_a_cut_too_short_is_tried_again_longer_until_it_holds_the_tokens(real_tokenizer_dir):
    """Texts of more characters per token than the cut allows for: the second try, sized
    from the first one's yield, is exact; the text that was long enough is not tried again."""
    backend = AutoTokenizer.from_pretrained(real_tokenizer_dir).backend_tokenizer
    texts = [("x" + " " * 9) * 3000, "internationalization " * 3000, "a b c d " * 3000]
    tried: list[list[int]] = []

    def encode(chosen: list[int], cut: list[str]):
        tried.append(chosen)
        return backend.encode_batch(cut, add_special_tokens=False)

    got = encode_cut(texts, [200] * 3, encode, lambda _, e: len(e))
    assert tried[0] == [0, 1, 2] and tried[1] == [0, 1]
    full = backend.encode_batch(texts, add_special_tokens=False)
    for g, f in zip(got, full, strict=True):
        assert len(g) < len(f)  # cut
        assert (g.ids[:200], g.offsets[:200]) == (f.ids[:200], f.offsets[:200])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_first_cut_holds_the_tokens_used_and_not_many_more(hf_tokenizer, paragraphs, lang):
    """What a long document costs is about what is used, in a sparse and a dense script."""
    texts = [p for p in paragraphs if p.isascii() == (lang == "en")]
    docs = [" ".join(texts[i : i + 12]) for i in range(0, len(texts) - 12, 5)]
    need = 497
    cuts = [doc[: first_limit(doc, need)] for doc in docs]
    counts = np.array(
        [len(ids) for ids in hf_tokenizer(cuts, add_special_tokens=False)["input_ids"]]
    )
    assert (counts >= need + 16).mean() > 0.9  # a second try is rare
    assert np.median(counts) < 1.5 * need
