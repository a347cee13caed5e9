"""PairTokenizer calls the Rust backend directly: the same ids as the transformers call."""

from __future__ import annotations

from transformers import AutoTokenizer

from crossrank.tokenization import PairTokenizer


def test_backend_ids_equal_the_transformers_call(tiny_model_dir, xquad) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    pairs = PairTokenizer(tokenizer, max_length=64, query_max_length=24)
    items = xquad["questions"][:20]
    queries = [it["question"] for it in items] + ["q " * 60, "<s> special </s>", "x"]
    docs = [it["context"] for it in items] + ["", "<pad> in text </s>", "ｆｕｌｌ　ｗｉｄｔｈ"]
    encoded = pairs.encode(queries, docs)
    capped = pairs.cap_queries(queries)
    want = tokenizer(capped, docs, truncation="only_second", max_length=64)["input_ids"]
    got = [
        encoded.ids[o : o + n].tolist()
        for o, n in zip(encoded.offsets, encoded.lengths, strict=True)
    ]
    assert got == want
    assert encoded.lengths.max() == 64  # long paragraphs were truncated
    # the truncation set on the shared backend does not leak into later plain calls
    assert len(tokenizer("word " * 200)["input_ids"]) > 64
