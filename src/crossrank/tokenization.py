"""Batched pair tokenization into a flat token buffer.

The fast tokenizer encodes all pairs of a call in one Rust call. The result is stored as one
flat ``int64`` array plus per-pair offsets and lengths, so that padded batches (CPU and
reference path) and packed batches (GPU varlen path) are both cut out of it with vectorised
numpy indexing rather than a Python loop over pairs.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase

from crossrank.validation import scrub_surrogates


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of ``n`` (query, document) pairs, flattened.

    Pair ``i`` occupies ``ids[offsets[i] : offsets[i] + lengths[i]]``. ``type_ids`` is set only
    for models that take ``token_type_ids`` (BERT-style cross-encoders).

    When long documents are split into windows (:meth:`PairTokenizer.encode_windows`), each row
    is one window: ``pair_index[row]`` is the input pair it belongs to (a pair's windows are
    consecutive rows, in document order) and ``spans[row]`` the character offsets
    ``(start, end)`` of its document text. Both are ``None`` for one-row-per-pair encodings.
    :meth:`take` cuts forward-pass batches, which need token data only, and drops them.
    """

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    type_ids: np.ndarray | None = None
    pair_index: np.ndarray | None = None
    spans: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def take(self, rows: np.ndarray) -> EncodedPairs:
        """A compact copy holding only ``rows``, in that order."""
        lengths = self.lengths[rows]
        index = _ranges(self.offsets[rows], lengths)
        offsets = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        type_ids = None if self.type_ids is None else self.type_ids[index]
        return EncodedPairs(self.ids[index], offsets, lengths, type_ids)

    @staticmethod
    def concat(parts: Sequence[EncodedPairs]) -> EncodedPairs:
        """Join several encodings into one (pairs keep their order, part after part)."""
        if len(parts) == 1:
            return parts[0]
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)
        type_ids = None
        if parts and parts[0].type_ids is not None:
            type_ids = np.concatenate([p.type_ids for p in parts if p.type_ids is not None])
        return EncodedPairs(ids, offsets, lengths, type_ids)

    def padded(self, rows: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
        """Right-padded ``input_ids``/``attention_mask`` (and ``token_type_ids``) for ``rows``."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        index = np.minimum(self.offsets[rows][:, None] + positions[None, :], len(self.ids) - 1)
        out = {
            "input_ids": np.where(mask, self.ids[index], pad_id),
            "attention_mask": mask.astype(np.int64),
        }
        if self.type_ids is not None:
            out["token_type_ids"] = np.where(mask, self.type_ids[index], 0)
        return out

    def packed(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated ids of ``rows`` and their int32 cumulative sequence lengths."""
        lengths = self.lengths[rows]
        cu_seqlens = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        return self.ids[_ranges(self.offsets[rows], lengths)], cu_seqlens


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    within = np.arange(total) - np.repeat(ends - lengths, lengths)
    return np.repeat(starts, lengths) + within


def _flatten(rows: list[list[int]], count: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=count)


class PairTokenizer:
    """Thread-safe wrapper around a fast tokenizer that encodes (query, document) pairs.

    Queries are capped at ``query_max_length`` tokens (tokenized once per distinct query, cut
    at the character end of the last kept token); documents are truncated to fill the rest of
    ``max_length`` (``truncation="only_second"``), exactly as
    ``tokenizer(query, document, truncation="only_second", max_length=max_length)`` does.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, max_length: int, query_max_length: int
    ) -> None:
        if not tokenizer.is_fast:
            raise ValueError("crossrank needs a fast (Rust) tokenizer; this checkpoint has none")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.returns_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.special_tokens_in_pair = tokenizer.num_special_tokens_to_add(pair=True)
        if query_max_length + self.special_tokens_in_pair >= max_length:
            raise ValueError(
                f"query_max_length={query_max_length} leaves no room for the document within "
                f"max_length={max_length} ({self.special_tokens_in_pair} special tokens per pair)"
            )
        # The Rust tokenizer keeps mutable truncation/padding state: one call at a time.
        self._lock = threading.Lock()

    def cap_queries(self, queries: Sequence[str]) -> list[str]:
        """Cut each query to its first ``query_max_length`` tokens (returned as text)."""
        return self._cut(queries, self.query_max_length)

    def cap_documents(self, documents: Sequence[str], max_tokens: int) -> list[str]:
        """Cut each document to its first ``max_tokens`` tokens (returned as text), e.g. for
        the Cohere API's ``max_tokens_per_doc``; cutting the text, not the ids, keeps score
        caches keyed by what was actually scored."""
        documents = scrub_surrogates(documents)
        with self._lock:
            return self._cut(documents, max_tokens)

    def _cut(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut at the character end of its ``max_tokens``-th token (special tokens
        not counted); the caller holds the lock."""
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        capped = list(texts)
        for i, offsets in enumerate(enc["offset_mapping"]):
            if len(offsets) > max_tokens:
                capped[i] = texts[i][: offsets[max_tokens - 1][1]]
        return capped

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Untruncated token count of each text, special tokens not counted.

        A pair's untruncated length is its query's count plus its document's count plus
        ``special_tokens_in_pair``; callers use it to refuse rather than truncate input.
        """
        texts = scrub_surrogates(texts)
        with self._lock:
            enc = self.tokenizer(
                texts,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        ids: list[list[int]] = enc["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))

    def _encode_pairs(self, queries: list[str], documents: list[str]) -> list[Any]:
        """The Rust tokenizer's encodings of the pairs (caller holds the lock).

        Calls the backend directly, with the truncation that ``tokenizer(queries, documents,
        truncation="only_second", max_length=max_length)`` sets: the same ids, without the
        Python-side conversion of every encoding (about a third of the time; measured in
        ``benchmarks/gpu_peers.py --micro``). Offsets are not computed.
        """
        backend = self.tokenizer.backend_tokenizer
        backend.enable_truncation(
            self.max_length, strategy="only_second", direction=self.tokenizer.truncation_side
        )
        backend.no_padding()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return list(encode(list(zip(queries, documents, strict=True))))

    def encode(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPairs:
        """Encode pair ``i`` = ``(queries[i], documents[i])``; callers pass validated input."""
        queries = scrub_surrogates(queries)
        documents = scrub_surrogates(documents)
        if not documents:
            return EncodedPairs.concat([])
        with self._lock:
            encodings = self._encode_pairs(self._capped(queries), documents)
        type_ids = [e.type_ids for e in encodings] if self.returns_type_ids else None
        return self._flat([e.ids for e in encodings], type_ids)

    def encode_windows(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        window_tokens: int | None,
        overlap: int | None,
    ) -> EncodedPairs:
        """Encode each pair as one row per document window (``pair_index``/``spans`` set).

        A window holds up to ``window_tokens`` document tokens (``None``: all the room
        ``max_length`` leaves after the capped query) and starts ``overlap`` tokens
        (``None``: an eighth of the window) before the previous one ends. A document that
        fits in one window gives exactly the row :meth:`encode` gives. The fast tokenizer
        cuts the windows itself (``return_overflowing_tokens`` with ``stride``) in one call
        per window layout; pairs whose queries have the same token count share a layout, so
        a call with one query is a single tokenizer call.
        """
        queries = scrub_surrogates(queries)
        documents = scrub_surrogates(documents)
        if not documents:
            empty = EncodedPairs.concat([])
            return replace(
                empty, pair_index=np.zeros(0, np.int64), spans=np.zeros((0, 2), np.int64)
            )
        with self._lock:
            capped = self._capped(queries)
            distinct = list(dict.fromkeys(capped))
            counted = self.tokenizer(
                distinct,
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            query_tokens = {q: len(ids) for q, ids in zip(distinct, counted, strict=True)}
            # Pairs whose windows share max_length and stride go through one tokenizer call.
            layouts: dict[tuple[int, int], list[int]] = {}
            for i, query in enumerate(capped):
                fixed = query_tokens[query] + self.special_tokens_in_pair
                room = self.max_length - fixed
                if window_tokens is not None:
                    room = min(room, window_tokens)
                stride = room // 8 if overlap is None else overlap
                # Rust panics unless stride < room; engine settings guarantee it, this keeps
                # it true even if a capped query re-tokenizes a token longer.
                layout = (fixed + room, max(0, min(stride, room - 1)))
                layouts.setdefault(layout, []).append(i)
            encodings = []
            for (max_length, stride), members in layouts.items():
                enc = self.tokenizer(
                    [capped[i] for i in members],
                    [documents[i] for i in members],
                    truncation="only_second",
                    max_length=max_length,
                    stride=stride,
                    return_overflowing_tokens=True,
                    return_attention_mask=False,
                    return_token_type_ids=self.returns_type_ids,
                )
                sample = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
                encodings.append((enc, np.asarray(members, dtype=np.int64)[sample]))
        input_ids = [row for enc, _ in encodings for row in enc["input_ids"]]
        type_ids = (
            [row for enc, _ in encodings for row in enc["token_type_ids"]]
            if self.returns_type_ids
            else None
        )
        spans = np.array(
            [_document_span(e) for enc, _ in encodings for e in enc.encodings], dtype=np.int64
        ).reshape(-1, 2)
        pair_index = np.concatenate([rows for _, rows in encodings])
        flat = self._flat(input_ids, type_ids)
        return EncodedPairs(flat.ids, flat.offsets, flat.lengths, flat.type_ids, pair_index, spans)

    def _capped(self, queries: list[str]) -> list[str]:
        """``queries`` cut to ``query_max_length`` tokens (each distinct query tokenized once)."""
        distinct = list(dict.fromkeys(queries))
        capped = dict(zip(distinct, self.cap_queries(distinct), strict=True))
        return [capped[q] for q in queries]

    def _flat(self, input_ids: list[list[int]], type_ids: list[list[int]] | None) -> EncodedPairs:
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(input_ids), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(lengths.sum())
        flat_types = _flatten(type_ids, total) if type_ids is not None else None
        return EncodedPairs(_flatten(input_ids, total), offsets, lengths, flat_types)


def _document_span(encoding: Encoding) -> tuple[int, int]:
    """Character offsets of the document (second sequence) text an encoded row holds.

    ``(0, 0)`` when the row holds no document token (an empty or whitespace-only document).
    """
    sequence_ids = encoding.sequence_ids
    if 1 not in sequence_ids:
        return (0, 0)
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    start = encoding.token_to_chars(first)
    end = encoding.token_to_chars(last)
    assert start is not None and end is not None  # document tokens always have offsets
    return (int(start[0]), int(end[1]))
