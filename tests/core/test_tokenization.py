"""Pair encoding equals the tokenizer's own pair call; the query cap behaves as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from crossrank.tokenization import EncodedPairs, PairTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(real_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


def rows(enc: EncodedPairs) -> list[list[int]]:
    return [enc.ids[o : o + n].tolist() for o, n in zip(enc.offsets, enc.lengths, strict=True)]


def test_pair_encoding_equals_the_tokenizers_pair_call(hf_tokenizer, xquad: dict) -> None:
    pairs = [(it["question"], it["context"]) for it in xquad["questions"][:60]]
    pairs += [("NFKC ｆｕｌｌｗｉｄｔｈ", "控制\x07字符 and emoji 😀"), ("q", "x " * 400)]
    encoder = PairTokenizer(hf_tokenizer, max_length=128, query_max_length=96)
    got = rows(encoder.encode([q for q, _ in pairs], [d for _, d in pairs]))
    for (query, doc), ids in zip(pairs, got, strict=True):
        assert (
            ids == hf_tokenizer(query, doc, truncation="only_second", max_length=128)["input_ids"]
        )
        assert len(ids) <= 128


def test_long_query_is_capped_and_the_document_keeps_the_rest(hf_tokenizer) -> None:
    query = " ".join(f"word{i}" for i in range(400))
    doc = "The document text. " * 200
    encoder = PairTokenizer(hf_tokenizer, max_length=256, query_max_length=192)
    (ids,) = rows(encoder.encode([query], [doc]))
    query_ids = hf_tokenizer(query, add_special_tokens=False)["input_ids"]
    assert len(query_ids) > 192
    sep = hf_tokenizer.sep_token_id
    first_sep = ids.index(sep)
    assert ids[1:first_sep] == query_ids[:192]  # exactly the first query_max_length tokens
    assert len(ids) == 256  # the document fills the rest
    # a short query is not touched
    (short,) = rows(encoder.encode(["short query"], [doc]))
    assert (
        short
        == hf_tokenizer("short query", doc, truncation="only_second", max_length=256)["input_ids"]
    )


def test_flat_buffer_views_agree(hf_tokenizer) -> None:
    encoder = PairTokenizer(hf_tokenizer, max_length=64, query_max_length=48)
    docs = ["a", "longer document " * 10, "", "中文文档"]
    enc = encoder.encode(["q"] * 4, docs)
    order = np.array([1, 3, 0])
    taken = enc.take(order)
    assert rows(taken) == [rows(enc)[i] for i in order]
    joined = EncodedPairs.concat([taken, enc.take(np.array([2]))])
    assert rows(joined) == [rows(enc)[i] for i in (1, 3, 0, 2)]
    padded = enc.padded(order, pad_id=1)
    for r, i in enumerate(order):
        n = int(enc.lengths[i])
        assert padded["input_ids"][r, :n].tolist() == rows(enc)[i]
        assert (padded["input_ids"][r, n:] == 1).all()
        assert padded["attention_mask"][r].sum() == n
    flat, cu = enc.packed(order)
    assert cu.dtype == np.int32 and cu.tolist() == [0, *np.cumsum(enc.lengths[order]).tolist()]
    assert flat.tolist() == [t for i in order for t in rows(enc)[i]]
