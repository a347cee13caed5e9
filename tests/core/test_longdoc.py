"""Long documents in chunk mode: windows, aggregation, spans, alignment.

Two models are used. A hand-set "marker" model whose score says whether a window contains
one of two marker tokens (so relevance is known by construction), and the tiny random
reranker, whose window scores are checked against an independent reference: windows cut
here with plain arithmetic on the tokenizer's offsets and scored one by one with a plain
transformers forward pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from crossrank import Reranker
from crossrank.longdoc import LongDocs

QUERY = "Which island exports cloves?"
RELEVANT = "The spice harbour of Zanzibar exports cloves."
WEAK = "Pemba also grows some cloves."
FILLER = [
    "The parties agree to the general terms set out in this agreement.",
    "Payments are due within thirty days of the invoice date.",
    "Either party may end the contract with written notice.",
    "This section describes the obligations of the supplier.",
    "All notices must be sent to the registered office address.",
]


def _filler(n_sentences: int, offset: int = 0) -> str:
    return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n_sentences))


def _marker_id(tokenizer, sentence: str, *avoid: str) -> int:
    """A token of ``sentence`` that no text in ``avoid`` contains."""
    taken = {t for text in avoid for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    own = [t for t in tokenizer(sentence, add_special_tokens=False)["input_ids"] if t not in taken]
    if not own:
        pytest.skip(f"this tokenizer has no token unique to {sentence!r}")
    return own[-1]


def _pair_ids(tokenizer, query_ids: list[int], doc_ids: list[int]) -> list[int]:
    """The XLM-R pair template ``<s> A </s></s> B </s>``, checked against the tokenizer."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [cls, *query_ids, sep, sep, *doc_ids, sep]


@pytest.fixture(scope="module")
def tokenizer(skeleton_dir: Path):
    return AutoTokenizer.from_pretrained(skeleton_dir)


def test_pair_template_matches_the_tokenizer(tokenizer):
    q, d = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (QUERY, WEAK))
    assert _pair_ids(tokenizer, q, d) == tokenizer(QUERY, WEAK)["input_ids"]


def _reference_windows(
    tokenizer, query: str, doc: str, max_length: int, chunk_tokens=None, overlap=None
):
    """Windows cut with plain arithmetic: (input ids, (start, end) char span) per window.

    The query keeps its first ``max_length * 3 // 4`` tokens (the default query_max_length).
    """
    q = tokenizer(query, add_special_tokens=False)["input_ids"][: max_length * 3 // 4]
    d = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = d["input_ids"], d["offset_mapping"]
    room = max_length - len(q) - tokenizer.num_special_tokens_to_add(pair=True)
    if chunk_tokens is not None:
        room = min(room, chunk_tokens)
    overlap = room // 8 if overlap is None else overlap
    starts = [0]
    while starts[-1] + room < len(ids):
        starts.append(starts[-1] + room - overlap)
    out = []
    for s in starts:
        e = min(s + room, len(ids))
        span = (offsets[s][0], offsets[e - 1][1]) if e > s else (0, 0)
        out.append((_pair_ids(tokenizer, q, ids[s:e]), span))
    return out


@pytest.fixture(scope="module")
def marker_model(skeleton_dir: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A 1-layer model scoring a window ~2 if it holds the strong marker token, ~1 if it holds
    only the weak one, 0 otherwise.

    Only the two marker tokens have non-zero embeddings; zero query/key weights make every
    position attend uniformly, so the first token's state is the (layer-normalised) mean of
    the marker embeddings in the window, read by the classifier.
    """
    filler = _filler(len(FILLER))
    strong = _marker_id(tokenizer, RELEVANT, QUERY, filler, WEAK)
    weak = _marker_id(tokenizer, WEAK, QUERY, filler, RELEVANT)
    config = AutoConfig.from_pretrained(
        skeleton_dir,
        num_hidden_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=1,
    )
    model = AutoModelForSequenceClassification.from_config(config)
    eye = torch.eye(64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "LayerNorm.weight" in name else 0 * param)
        words = model.roberta.embeddings.word_embeddings.weight
        words[strong, 0], words[strong, 1] = 1.0, -1.0
        words[weak, 2], words[weak, 3] = 1.0, -1.0
        layer = model.roberta.encoder.layer[0]
        layer.attention.self.value.weight.copy_(100 * eye)
        layer.attention.output.dense.weight.copy_(eye)
        model.classifier.dense.weight.copy_(eye)
        model.classifier.out_proj.weight[0, 0] = 2.0
        model.classifier.out_proj.weight[0, 2] = 1.0
    out = tmp_path_factory.mktemp("marker-model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out, tokenizer, strong, weak


@pytest.fixture(scope="module")
def marker_rerankers(marker_model) -> tuple[Reranker, Reranker]:
    """(truncate mode, chunk mode) on the marker model."""
    path = str(marker_model[0])
    return Reranker(path, device="cpu"), Reranker(path, device="cpu", long_docs="chunk")


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir: Path):
    """Rerankers on the tiny model with max_length=64, one per distinct settings."""
    made: dict[tuple, Reranker] = {}

    def get(**settings) -> Reranker:
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = Reranker(str(tiny_model_dir), device="cpu", max_length=64, **settings)
        return made[key]

    return get


@pytest.fixture(scope="module")
def long_doc(marker_model) -> str:
    """RELEVANT after token 2000, placed so that exactly one 512-token window holds it."""
    _, tokenizer, strong, _ = marker_model
    for n in range(len(FILLER), 400):
        doc = f"{_filler(n)} {RELEVANT} {_filler(12, offset=3)}"
        start = doc.index(RELEVANT)
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        sentence = [
            i
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if start <= a < start + len(RELEVANT)
        ]
        if sentence[0] <= 2000:
            continue
        windows = _reference_windows(tokenizer, QUERY, doc, 512)
        holding = [w for w, _ in windows if strong in w]
        inside = [
            span for _, span in windows if span[0] <= start and start + len(RELEVANT) <= span[1]
        ]
        if len(holding) == 1 and len(inside) == 1:
            return doc
    raise AssertionError("could not place the relevant sentence in exactly one window")


def _spy_rows(monkeypatch, reranker: Reranker) -> list[list[int]]:
    """Record the token ids of every row the runner scores."""
    rows: list[list[int]] = []
    submit = reranker.runner.submit

    def spy(encoded):
        rows.extend(
            encoded.ids[o : o + n].tolist()
            for o, n in zip(encoded.offsets, encoded.lengths, strict=True)
        )
        return submit(encoded)

    monkeypatch.setattr(reranker.runner, "submit", spy)
    return rows


def test_relevant_sentence_after_token_2000_ranks_first_only_in_chunk_mode(
    marker_model, marker_rerankers, long_doc, monkeypatch
):
    _, tokenizer, strong, _ = marker_model
    docs = [_filler(3), WEAK + " " + _filler(2), long_doc, _filler(4, offset=2)]
    truncating, chunking = marker_rerankers

    truncated_rows = _spy_rows(monkeypatch, truncating)
    truncated = truncating.rerank(QUERY, docs)
    assert truncated[0].index == 1  # the weak marker wins: the long document lost its end
    assert [r.index for r in truncated].index(2) > 0
    assert len(truncated_rows) == 4 and not any(strong in row for row in truncated_rows)
    assert all(r.best_span is None for r in truncated)

    chunked_rows = _spy_rows(monkeypatch, chunking)
    chunked = chunking.rerank(QUERY, docs)
    assert chunked[0].index == 2
    expected = _reference_windows(tokenizer, QUERY, long_doc, 512)
    assert len(chunked_rows) == 3 + len(expected)  # every window went through the model
    assert sum(strong in row for row in chunked_rows) == 1
    assert chunked[0].score > chunked[1].score  # the marker window scored highest
    assert chunked[1].index == 1


def test_best_span_points_at_the_relevant_sentence(marker_model, marker_rerankers, long_doc):
    _, tokenizer, strong, _ = marker_model
    chunking = marker_rerankers[1]
    (result,) = chunking.rerank(QUERY, [long_doc])
    start, end = result.best_span
    assert RELEVANT in long_doc[start:end]
    windows = _reference_windows(tokenizer, QUERY, long_doc, 512)
    assert result.best_span == next(span for ids, span in windows if strong in ids)
    assert start > len(long_doc) // 2


def test_async_path_chunks_and_returns_the_same_spans(marker_rerankers, long_doc):
    chunking = marker_rerankers[1]
    docs = [WEAK, long_doc, _filler(2)]

    async def both():
        return await asyncio.gather(chunking.arerank(QUERY, docs), chunking.ascore(QUERY, docs))

    results, scores = asyncio.run(both())
    assert results == chunking.rerank(QUERY, docs)
    assert results[0].index == 1
    np.testing.assert_array_equal(scores, chunking.score(QUERY, docs))


# ------------------------------------------------------------- random tiny model, reference
@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path, tokenizer):
    """The tiny model through plain transformers (its tokenizer is the skeleton's)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def _reference_logits(reference_model, query, doc, max_length, **window_args):
    model, tokenizer = reference_model
    windows = _reference_windows(tokenizer, query, doc, max_length, **window_args)
    with torch.inference_mode():
        logits = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids, _ in windows]
    return np.array(logits), [span for _, span in windows]


@pytest.fixture(scope="module")
def mixed_docs() -> list[str]:
    return [
        _filler(1),
        _filler(9, offset=1),  # several 64-token windows
        "",
        WEAK,
        _filler(5, offset=4) + " " + RELEVANT,
        "   ",
        _filler(2, offset=2),
    ]


@pytest.mark.parametrize("how", ["max", "mean", "first"])
def test_aggregate_modes_match_the_reference_windows(tiny64, reference_model, mixed_docs, how):
    reranker = tiny64(long_docs="chunk", aggregate=how)
    raw = reranker.score(QUERY, mixed_docs, normalize=False)
    results = {r.index: r for r in reranker.rerank(QUERY, mixed_docs)}
    for i, doc in enumerate(mixed_docs):
        logits, spans = _reference_logits(reference_model, QUERY, doc, 64)
        expected = {"max": logits.max(), "mean": logits.mean(), "first": logits[0]}[how]
        assert raw[i] == pytest.approx(expected, abs=1e-5), (how, i)
        # the span is the best window's whatever the aggregate
        assert results[i].best_span == spans[int(np.argmax(logits))]
    assert (
        sum(len(_reference_windows(reference_model[1], QUERY, d, 64)) > 1 for d in mixed_docs) >= 2
    )


def test_first_window_equals_truncate_mode(tiny64, mixed_docs):
    truncating, first = tiny64(), tiny64(long_docs="chunk", aggregate="first")
    np.testing.assert_allclose(
        first.score(QUERY, mixed_docs), truncating.score(QUERY, mixed_docs), atol=1e-6
    )


def test_order_and_index_alignment_with_mixed_short_and_long_docs(tiny64, mixed_docs):
    reranker = tiny64(long_docs="chunk", aggregate="max")
    scores = reranker.score(QUERY, mixed_docs)
    results = reranker.rerank(QUERY, mixed_docs)
    assert sorted(r.index for r in results) == list(range(len(mixed_docs)))
    assert [r.score for r in results] == sorted(scores.tolist(), reverse=True)
    for r in results:
        assert r.document is mixed_docs[r.index]
        assert r.score == pytest.approx(float(scores[r.index]))
        start, end = r.best_span
        assert 0 <= start <= end <= len(r.document)
    # each document scores the same alone as inside the mixed call
    alone = np.array([reranker.score(QUERY, [d])[0] for d in mixed_docs])
    np.testing.assert_allclose(scores, alone, atol=1e-6)
    assert [r.best_span for r in results if not r.document.strip()] == [(0, 0), (0, 0)]


def test_chunk_tokens_with_mixed_queries_matches_the_reference(tiny64, reference_model, mixed_docs):
    """chunk_tokens smaller than the room, queries of different lengths (several windowings)."""
    queries = [QUERY, "cloves", "What are the general terms of the agreement with the supplier?"]
    pairs = [(queries[i % 3], d) for i, d in enumerate(mixed_docs)]
    reranker = tiny64(long_docs="chunk", chunk_tokens=20, chunk_overlap=5)
    raw = reranker.score_pairs(pairs, normalize=False)
    for i, (q, d) in enumerate(pairs):
        logits, _ = _reference_logits(reference_model, q, d, 64, chunk_tokens=20, overlap=5)
        assert raw[i] == pytest.approx(logits.max(), abs=1e-5), i
    encoded = reranker.encode([q for q, _ in pairs], [d for _, d in pairs])
    assert np.bincount(encoded.pair_index).tolist() == [
        len(_reference_windows(reference_model[1], q, d, 64, chunk_tokens=20, overlap=5))
        for q, d in pairs
    ]


def test_chunk_mode_with_only_short_docs_equals_truncate_mode_exactly(
    tiny_model_dir, tiny_reranker
):
    docs = [_filler(1), WEAK, RELEVANT, "", "短い文書です。", _filler(2, offset=3)[:90]]
    chunking, truncating = (
        Reranker(str(tiny_model_dir), device="cpu", long_docs="chunk"),
        tiny_reranker,
    )
    assert len(chunking.encode([QUERY] * len(docs), docs)) == len(docs)  # all fit in one window
    np.testing.assert_array_equal(chunking.score(QUERY, docs), truncating.score(QUERY, docs))
    chunked, truncated = chunking.rerank(QUERY, docs), truncating.rerank(QUERY, docs)
    assert [(r.index, r.score) for r in chunked] == [(r.index, r.score) for r in truncated]
    for r in chunked:  # one window: the whole document
        assert r.document.strip() == r.document[slice(*r.best_span)].strip()


def test_empty_input_in_chunk_mode(tiny64):
    chunking = tiny64(long_docs="chunk", aggregate="max")
    assert chunking.score(QUERY, []).shape == (0,)
    assert chunking.rerank(QUERY, []) == []
    assert asyncio.run(chunking.arerank(QUERY, [])) == []
    assert chunking.score_pairs([]).shape == (0,)


def test_window_must_advance():
    LongDocs("chunk", chunk_tokens=16, chunk_overlap=15).check_room(100)
    with pytest.raises(ValueError, match="chunk_overlap=16"):
        LongDocs("chunk", chunk_tokens=16, chunk_overlap=16).check_room(100)
    with pytest.raises(ValueError, match="chunk_overlap=40"):
        LongDocs("chunk", chunk_overlap=40).check_room(40)
    LongDocs("truncate", chunk_overlap=40).check_room(40)  # irrelevant when truncating


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"long_docs": "split"}, "long_docs"),
        ({"long_docs": "chunk", "aggregate": "median"}, "aggregate"),
        ({"long_docs": "chunk", "chunk_tokens": 0}, "chunk_tokens"),
        ({"long_docs": "chunk", "chunk_overlap": -1}, "chunk_overlap"),
        ({"long_docs": "chunk", "max_length": 64, "chunk_overlap": 40}, "chunk_overlap=40"),
    ],
)
def test_bad_long_doc_settings_are_refused(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Reranker(str(tiny_model_dir), device="cpu", **kwargs)
