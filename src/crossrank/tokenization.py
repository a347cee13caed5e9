"""Batched pair tokenization into a flat token buffer: cut to what scoring can use, spread
over crossrank's own threads, with no process-wide lock.

The fast tokenizer encodes the pairs of a chunk in one Rust call. The result is stored as
one flat ``int64`` array plus per-pair offsets and lengths, so that padded batches (CPU and
reference path) and packed batches (GPU varlen path) are both cut out of it with vectorised
numpy indexing rather than a Python loop over pairs.

**Own parallelism.** Where the Rust tokenizer does not parallelize a batch call itself
(``TOKENIZERS_PARALLELISM=false``, or a process forked after the tokenizer was used, where it
turns its parallelism off), a call of at least ``2 * _MIN_CHUNK_PAIRS`` pairs is split into
chunks (at most ``_MAX_CHUNK_PAIRS`` pairs each): the first is tokenized on the calling
thread, the others on a thread pool of crossrank's own, sized from the cores this process may
use (``os.sched_getaffinity``), as many as there are cores not already busy with other calls
(half of those for a call of fewer than ``_WIDE_CALL_PAIRS`` pairs, see :func:`chunk_bounds`):
concurrent calls share the cores rather than queue slivers of each other on the pool. The
Rust tokenizer releases the GIL, so this is about as fast as the tokenizer's own parallelism.
Where that is on, a call goes to it whole (split only into ``_MAX_CHUNK_PAIRS`` chunks): both
at once oversubscribe the cores, measured on one 16-core H200 host (1x50 XQuAD-R pairs, real
XLM-R tokenizer): 4.3 ms by the tokenizer's threads alone, 8.3 ms by crossrank's 16 chunks on
top of them, 6.3 ms by crossrank's chunks with the tokenizer's parallelism off. The user's
environment is only read, never changed. A call's ``cancel`` event is checked between chunks,
so a cancelled request stops consuming CPU after at most one chunk per thread.

**No lock.** The Rust tokenizer keeps its truncation setting as state: each setting is
encoded through a view of its own that shares the tokenizer's model (:class:`_SharedBackend`),
so calls never wait for each other, whatever settings they need.

**Cut before tokenizing.** Only a document's first tokens are scored (the room ``max_length``
leaves in truncate mode; the first ``max_windows`` windows in chunk mode), so each document
is cut, before tokenizing, to ``CHARS_PER_TOKEN`` characters for every token it can use
plus ``CUT_MARGIN_TOKENS`` (a character of a dense script, CJK, kana, hangul or emoji, counts
as ``CHARS_PER_TOKEN / DENSE_CHARS_PER_TOKEN`` characters), at the next space within
``_SPACE_SEARCH`` characters (a word boundary: the words before it tokenize as in the full
text) or else inside a word, where the tokens well before the cut do not depend on it,
except inside a run of a short repeated pattern (``"0" * n``), which is kept whole up to 1 Mi
characters. If the cut text yields fewer tokens than those used plus the margin, it is cut
again, longer by what its own characters per token say is missing plus 10 % (1.1x to 4x),
until it yields them or is the whole text. The kept tokens and their character offsets are
therefore the full text's (tested over XQuAD-R and long synthetic documents in several
scripts in ``tests/core/test_cut.py``), and a 1 MB document costs what a 3 kB one does
(``benchmarks/tokenize_cost.py``). Texts are cut only for right-side truncation (the
tokenizer's default), the side that keeps the first tokens.

Both constants are measured with the real XLM-R tokenizer (bge-reranker-v2-m3) over the
distinct XQuAD-R paragraphs, 240 per language (``python benchmarks/tokenize_cost.py
--chars-per-token``). English characters per token: mean 4.34, p90 4.81, p99 5.27, max 5.66;
5.0 is above 97 % of single paragraphs (a document of several averages out towards the
mean), so a cut of prose rarely needs its second try, and it keeps ~1.2x the characters of a
document of exactly the tokens used. Chinese: 85 % dense characters, 1.49 characters per
token (p99 1.96); 1.6 per dense character (5.0 per other one) gives an estimate as safe as
5.0 is for English: real / estimated tokens of single paragraphs mean 1.21, p1 0.97, min
0.96 (English at 5.0: mean 1.16, p1 0.95, min 0.88). Text sparser than these constants
(sample sentences: Russian of common words 7.7 characters per token; Japanese, kanji mixed
with kana, 1.77; neither is in the data measured) often takes the second try, sized from
the first: about twice the characters used in all.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tokenizers import Encoding, Tokenizer
from transformers import PreTrainedTokenizerBase

from crossrank.validation import check_instruction, scrub_surrogates

#: Characters a cut keeps per token it must yield (measured, see the module docstring): for
#: most scripts, and for the dense ones (code points from ``DENSE_FROM`` up: CJK, kana,
#: hangul, emoji), which yield a token every one or two characters.
CHARS_PER_TOKEN = 5.0
DENSE_CHARS_PER_TOKEN = 1.6
DENSE_FROM = 0x2E80
#: Tokens a cut text must yield beyond those used, so that the ones used are unaffected by
#: where the cut lands (a word cut in two re-tokenizes only its own end).
CUT_MARGIN_TOKENS = 16
#: How far past the character budget a cut looks for a space (a word boundary).
_SPACE_SEARCH = 64
#: Periodic runs a cut keeps whole (see :func:`periodic_run_end`).
_MAX_PERIOD = 32
_MAX_RUN_CHARS = 1 << 20
#: Fewest pairs worth sending to another thread; most pairs per chunk; fewest pairs of a
#: call split over every thread (see :func:`chunk_bounds`).
_MIN_CHUNK_PAIRS = 2
_MAX_CHUNK_PAIRS = 256
_WIDE_CALL_PAIRS = 128
_MAX_THREADS = 32
#: Truncation settings that keep a tokenizer view of their own (see :class:`_SharedBackend`).
_MAX_VIEWS = 64

T = TypeVar("T")


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
        """Join several encodings into one (pairs keep their order, part after part).

        ``pair_index``/``spans`` are kept when every part has them (window rows of one call,
        whose ``pair_index`` already counts pairs across the parts)."""
        if len(parts) == 1:
            return parts[0]
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)
        type_ids = None
        if parts and parts[0].type_ids is not None:
            type_ids = np.concatenate([p.type_ids for p in parts if p.type_ids is not None])
        windowed = [p for p in parts if p.pair_index is not None and p.spans is not None]
        if not parts or len(windowed) < len(parts):
            return EncodedPairs(ids, offsets, lengths, type_ids)
        pair_index = np.concatenate([p.pair_index for p in parts if p.pair_index is not None])
        spans = np.concatenate([p.spans for p in parts if p.spans is not None])
        return EncodedPairs(ids, offsets, lengths, type_ids, pair_index, spans)

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


# ------------------------------------------------------------------- own thread pool
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_queued = 0  # chunks handed to the pool and not finished (guarded by _pool_lock)


def tokenizer_threads() -> int:
    """Threads crossrank tokenizes on: the cores this process may use (at most 32)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_THREADS))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(tokenizer_threads(), thread_name_prefix="crossrank-tok")
        return _pool


#: values of ``TOKENIZERS_PARALLELISM`` that turn the Rust tokenizer's parallelism off, as
#: the tokenizers crate reads the variable (``utils/parallelism.rs``), case-insensitive
_OFF_VALUES = frozenset({"", "off", "false", "f", "no", "n", "0"})
_forked = False


def rust_parallelism() -> bool:
    """Whether the Rust tokenizer parallelizes a batch call itself: as ``TOKENIZERS_PARALLELISM``
    says (unset: on), except in a forked child, where the tokenizer turns it off once the
    parent had used it; that cannot be asked, so a child assumes off."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    if value is not None:
        return value.strip().lower() not in _OFF_VALUES
    return not _forked


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool."""
    global _pool, _pool_lock, _queued, _forked
    _pool, _pool_lock, _queued, _forked = None, threading.Lock(), 0, True


def _spare_threads() -> int:
    """Cores not taken now by the calling thread or chunks queued on the pool."""
    with _pool_lock:
        return max(0, tokenizer_threads() - 1 - _queued)


def _offload(pool: ThreadPoolExecutor, run: Callable[[int, int], T], lo: int, hi: int) -> Future[T]:
    """``run(lo, hi)`` on ``pool``, counted in ``_queued`` until it finishes or is cancelled."""
    global _queued

    def release(_: object = None) -> None:
        global _queued
        with _pool_lock:
            _queued -= 1

    with _pool_lock:
        _queued += 1
    try:
        future = pool.submit(run, lo, hi)
    except BaseException:  # a pool shut down (interpreter exit) takes nothing
        release()
        raise
    future.add_done_callback(release)
    return future


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def chunk_bounds(n: int, threads: int) -> list[int]:
    """Boundaries of the chunks a call of ``n`` pairs is split into: one chunk per thread
    when each gets at least ``_MIN_CHUNK_PAIRS`` pairs, and none larger than
    ``_MAX_CHUNK_PAIRS``; a call of fewer than ``_WIDE_CALL_PAIRS`` pairs takes half the
    threads (at least two).

    Why half: a small call is waited for (one request's latency), and more chunks made it
    slower, measured on one 16-core H200 host with ``TOKENIZERS_PARALLELISM=false``
    (bge-reranker-v2-m3 random weights, XQuAD-R, requests alternating between pool sizes in
    one process): a 1x50 request 21.4 ms p50 on 16 threads, 19.3 on 8, 19.2 on 4; 1x50 long
    documents 49.5, 46.2, 47.0 ms. A large call is throughput (bulk scoring tokenizes one
    call while the GPU runs the last), where every thread counts: bulk long documents ran at
    738 pairs/s with the pool at 8 threads against 1,081 at 16."""
    if n < _WIDE_CALL_PAIRS:
        threads = max(min(threads, 2), threads // 2)
    chunks = max(1, -(-n // _MAX_CHUNK_PAIRS), min(threads, n // _MIN_CHUNK_PAIRS))
    return [n * k // chunks for k in range(chunks + 1)]


def split_call(
    work: Callable[[int, int], T], n: int, cancel: threading.Event | None = None
) -> list[T]:
    """``work(lo, hi)`` over the chunks of :func:`chunk_bounds`, in order: the first chunk
    on the calling thread, the others on the pool. Raises ``CancelledError`` once
    ``cancel`` is set (chunks not started are dropped).

    A call is split over the cores that are spare when it starts (none where the Rust
    tokenizer parallelizes itself), not over all of them: when many calls run at once (a
    server's concurrent requests), each runs on its own thread (in chunks of at most
    ``_MAX_CHUNK_PAIRS``) instead of queueing slivers of itself behind the other calls' on
    the pool; a lone call gets every thread (half of them when it is small:
    :func:`chunk_bounds`)."""

    def run(lo: int, hi: int) -> T:
        if cancel is not None and cancel.is_set():
            raise CancelledError("tokenization cancelled")
        return work(lo, hi)

    spare = 0 if rust_parallelism() else _spare_threads()
    chunks = list(itertools.pairwise(chunk_bounds(n, 1 + spare)))
    pool = _executor() if spare and len(chunks) > 1 else None
    futures = [_offload(pool, run, lo, hi) for lo, hi in chunks[1:]] if pool else []
    try:
        first = run(*chunks[0])
        if pool is None:
            return [first, *(run(lo, hi) for lo, hi in chunks[1:])]
        return [first, *(future.result() for future in futures)]
    finally:
        for future in futures:
            future.cancel()


# ------------------------------------------------------------ one tokenizer, many threads
Truncation = tuple[int, int] | None
"""A Rust tokenizer setting: ``(max_length, stride)`` of ``only_second`` truncation, or
``None`` for none."""


class _SharedBackend:
    """The Rust tokenizer shared by every thread, with no lock around encoding.

    The tokenizer keeps its truncation as state that encoding reads, so each setting gets
    a *view* of its own: a ``Tokenizer`` over the same model, normalizer, pre-tokenizer,
    post-processor and decoder (shared objects that encoding only reads), with the same
    added vocabulary and its own truncation. A view is built once per setting (about
    0.4 ms and 0.2 MB for bge-reranker-v2-m3's tokenizer, where a full copy takes 1.3 s
    and 290 MB) and never written again, so any number of threads encode at once,
    whatever settings they need, and the tokenizer the caller passed is never changed.

    (One tokenizer switched between settings before: a call that needed another setting
    waited for the running calls, and every call behind it for it. A server's concurrent
    requests alternate between two settings, the query cap's and the pairs', so their
    tokenization ran nearly one call at a time.)

    A tokenizer whose added vocabulary a view does not reproduce (same ids, same flags)
    falls back to one lock around setting the truncation and encoding.
    """

    def __init__(self, backend: Tokenizer, direction: str) -> None:
        self._backend = backend
        self._direction = direction
        self._views: dict[Truncation, Tokenizer] = {}
        self._building = threading.Lock()
        self._exact = True  # views reproduce the backend (checked on the first build)
        self._fallback = threading.Lock()

    @contextmanager
    def using(self, setting: Truncation) -> Iterator[Tokenizer]:
        view = self._views.get(setting)
        if view is None:
            view = self._view(setting)
        if view is not None:
            yield view
            return
        with self._fallback:
            self._truncate(self._backend, setting)
            yield self._backend

    def _view(self, setting: Truncation) -> Tokenizer | None:
        with self._building:
            view = self._views.get(setting)
            if view is None and self._exact:
                view = self._build()
                self._exact = view is not None
                if view is not None:
                    self._truncate(view, setting)
                    if len(self._views) >= _MAX_VIEWS:  # many window layouts: start over
                        self._views.clear()
                    self._views[setting] = view
            return view

    def _build(self) -> Tokenizer | None:
        """A view without truncation; ``None`` when it would not encode as the backend."""
        source = self._backend
        view = Tokenizer(source.model)
        for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
            value = getattr(source, part)
            if value is not None:
                setattr(view, part, value)
        added = source.get_added_tokens_decoder()
        runs = itertools.groupby((added[i] for i in sorted(added)), key=lambda t: t.special)
        for special, tokens in runs:  # in id order, so that each gets its id again
            (view.add_special_tokens if special else view.add_tokens)(list(tokens))
        if hasattr(source, "encode_special_tokens"):
            view.encode_special_tokens = source.encode_special_tokens
        return view if view.get_added_tokens_decoder() == added else None

    def _truncate(self, tokenizer: Tokenizer, setting: Truncation) -> None:
        tokenizer.no_padding()
        if setting is None:
            tokenizer.no_truncation()
        else:
            max_length, stride = setting
            tokenizer.enable_truncation(
                max_length, stride=stride, strategy="only_second", direction=self._direction
            )


# ------------------------------------------------------------------------ the cut
def char_budget(tokens: int) -> int:
    """Characters a cut keeps for a text (of no dense script) that must yield ``tokens``
    tokens."""
    return int((tokens + CUT_MARGIN_TOKENS) * CHARS_PER_TOKEN) + 1


def first_limit(text: str, tokens: int) -> int:
    """About where a first cut of ``text`` must land to yield ``tokens`` tokens: after
    :func:`char_budget` characters, a dense character counting as ``CHARS_PER_TOKEN /
    DENSE_CHARS_PER_TOKEN`` of them."""
    budget = char_budget(tokens)
    window = text[:budget]
    if window.isascii():  # known without a scan
        return budget
    # surrogatepass: lone surrogates are scrubbed after the cut
    dense = np.frombuffer(window.encode("utf-32-le", "surrogatepass"), np.uint32) >= DENSE_FROM
    if not dense.any():
        return budget
    weights = np.where(dense, CHARS_PER_TOKEN / DENSE_CHARS_PER_TOKEN, 1.0)
    return int(np.searchsorted(np.cumsum(weights), budget)) + 1


def next_limit(cut: int, yielded: int, target: int) -> int:
    """Where to cut again a text whose cut at ``cut`` characters yielded ``yielded`` tokens,
    fewer than ``target``: at this text's own characters per token, with 10 % to spare
    (from 1.1 up to 4 times as long, and always longer)."""
    return max(cut + 1, int(cut * min(4.0, 1.1 * target / max(yielded, 1))))


def cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` to about ``limit`` characters: at the next space within
    ``_SPACE_SEARCH`` characters (a word boundary), else inside the word, past the end of
    a periodic run the cut would split (see :func:`periodic_run_end`); its length if
    shorter."""
    if len(text) <= limit:
        return len(text)
    space = text.find(" ", limit, limit + _SPACE_SEARCH)
    if space != -1:
        return space
    end = periodic_run_end(text, limit)
    if end == limit:
        return limit
    space = text.find(" ", end, end + _SPACE_SEARCH)
    return min(len(text), end + _SPACE_SEARCH) if space == -1 else space


def periodic_run_end(text: str, pos: int) -> int:
    """End of the run of a short repeated pattern (period up to ``_MAX_PERIOD``) that
    ``pos`` is inside of; ``pos`` when it is not inside one.

    How the tokenizer splits a long run such as ``"0" * n`` or ``"ab" * n`` into pieces
    depends on the run's whole length, down to its first pieces, so a cut must keep the
    whole run. Runs are followed up to ``_MAX_RUN_CHARS`` characters past ``pos``: a longer
    one is cut there, the one case in which the first tokens may differ from the full
    text's (bounded work wins over a pathological input).
    """
    period = next(
        (
            p
            for p in range(1, _MAX_PERIOD + 1)
            if pos >= max(16, 3 * p)
            and text[pos - max(16, 3 * p) + p : pos] == text[pos - max(16, 3 * p) : pos - p]
        ),
        None,
    )
    if period is None:
        return pos
    end, cap, block = pos, min(len(text), pos + _MAX_RUN_CHARS), 1024
    while end < cap:
        stop = min(end + block, cap)
        if text[end:stop] != text[end - period : stop - period]:
            while text[end] == text[end - period]:
                end += 1
            return end
        end, block = stop, 2 * block
    return end


def _short(text: str, tokens: int) -> bool:
    """Whether :func:`first_limit` would keep all of ``text`` even were every character
    dense: then no scan is needed (most documents, whose cut is the room of a long prompt)."""
    return len(text) * (CHARS_PER_TOKEN / DENSE_CHARS_PER_TOKEN) <= char_budget(tokens)


Encode = Callable[[list[int], list[str]], list[Encoding]]
"""Encode the texts given (cut versions of the texts at the indices given)."""


def encode_cut(
    texts: Sequence[str],
    needs: Sequence[int | None],
    encode: Encode,
    yielded: Callable[[int, Encoding], int],
) -> list[Encoding]:
    """Encodings of ``texts``, each tokenized from a cut that yields its first ``needs[i]``
    tokens (``None``: the whole text) exactly as the whole text does.

    ``yielded(i, encoding)`` counts the tokens text ``i``'s cut yielded; a cut that yielded
    fewer than ``needs[i] + CUT_MARGIN_TOKENS`` is retried longer (:func:`next_limit`).
    """
    limits = [
        len(text) if need is None or _short(text, need) else first_limit(text, need)
        for text, need in zip(texts, needs, strict=True)
    ]
    out: list[Encoding | None] = [None] * len(texts)
    todo = list(range(len(texts)))
    while todo:
        cuts = [cut_point(texts[i], limits[i]) for i in todo]
        # Scrubbed after the cut (one code point for one keeps every offset): a long
        # document is never scanned whole.
        cut_texts = [texts[i][:cut] for i, cut in zip(todo, cuts, strict=True)]
        encodings = encode(todo, scrub_surrogates(cut_texts))
        retry = []
        for i, cut, encoding in zip(todo, cuts, encodings, strict=True):
            need = needs[i]
            target = (need or 0) + CUT_MARGIN_TOKENS
            count = yielded(i, encoding) if need is not None and cut < len(texts[i]) else target
            if count < target:
                limits[i] = next_limit(cut, count, target)
                retry.append(i)
            else:
                out[i] = encoding
        todo = retry
    return [e for e in out if e is not None]


def document_tokens(encoding: Encoding, stride: int) -> int:
    """Document (second sequence) tokens a truncated pair encoding covers, its overflowing
    windows included (consecutive windows share ``stride`` tokens)."""
    windows = [encoding, *encoding.overflowing]
    # Every window holds the same query and special tokens: count them in the last one.
    fixed = len(windows[-1]) - windows[-1].sequence_ids.count(1)
    return sum(map(len, windows)) - fixed * len(windows) - stride * (len(windows) - 1)


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
        side = tokenizer.truncation_side
        self._backend = _SharedBackend(tokenizer.backend_tokenizer, side)
        # A cut keeps a text's first tokens, which right-side truncation keeps.
        self._cuts = side == "right"

    def cap_queries(self, queries: Sequence[str]) -> list[str]:
        """Cut each query to its first ``query_max_length`` tokens (returned as text)."""
        return self._cut(queries, self.query_max_length)[0]

    def cap_documents(self, documents: Sequence[str], max_tokens: int) -> list[str]:
        """Cut each document to its first ``max_tokens`` tokens (returned as text), e.g. for
        the Cohere API's ``max_tokens_per_doc``; cutting the text, not the ids, keeps score
        caches keyed by what was actually scored."""
        return scrub_surrogates(self._cut(documents, max_tokens)[0])

    def check_instruction(self, instruction: Any) -> str | None:
        """The instruction a call's prompts take, ``None`` for the tokenizer's own. The
        pairs of an encoder cross-encoder have no prompt, so anything but ``None`` is an
        :class:`~crossrank.errors.OptionError` naming ``instruction``."""
        return check_instruction(instruction, decoder=False)

    def template_tokens(self, instruction: str | None = None) -> int:
        """Tokens of a pair besides its query and document with a call's (checked)
        ``instruction``: ``special_tokens_in_pair`` here, where there is none."""
        self.check_instruction(instruction)
        return self.special_tokens_in_pair

    def token_counts(self, texts: Sequence[str], at_most: int | None = None) -> np.ndarray:
        """Token count of each text, special tokens not counted.

        A pair's untruncated length is its query's count plus its document's count plus
        ``special_tokens_in_pair``; callers use it to refuse rather than truncate input.
        With ``at_most``, a text is tokenized only as far as needed to tell whether it has
        more: a count above ``at_most`` is then a lower bound.
        """
        need = None if at_most is None else at_most + 1
        encodings = self._encode_texts(list(texts), need, offsets=False)
        return np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))

    def _encode_texts(self, texts: list[str], need: int | None, *, offsets: bool) -> list[Encoding]:
        """Encodings of single texts without special tokens, each exact in its first
        ``need`` tokens (``None``: all of them)."""

        def encode(_: list[int], cut: list[str]) -> list[Encoding]:
            with self._backend.using(None) as backend:
                if offsets:
                    return list(backend.encode_batch(cut, add_special_tokens=False))
                return list(_fast_encode(backend)(cut, add_special_tokens=False))

        need = need if self._cuts else None
        return encode_cut(texts, [need] * len(texts), encode, lambda _, e: len(e))

    def _cut(self, texts: Sequence[str], max_tokens: int) -> tuple[list[str], list[int]]:
        """Each text cut at the character end of its ``max_tokens``-th token (special tokens
        not counted), and its token count after the cut."""
        encodings = self._encode_texts(list(texts), max_tokens, offsets=True)
        capped, counts = list(texts), []
        for i, encoding in enumerate(encodings):
            if len(encoding) > max_tokens:
                capped[i] = texts[i][: encoding.offsets[max_tokens - 1][1]]
            counts.append(min(len(encoding), max_tokens))
        return capped, counts

    def _capped(self, queries: list[str]) -> tuple[list[str], list[int]]:
        """``queries`` cut to ``query_max_length`` tokens (each distinct query tokenized
        once), and their token counts."""
        distinct = list(dict.fromkeys(queries))
        capped, counts = self._cut(distinct, self.query_max_length)
        by_query = {q: (c, n) for q, c, n in zip(distinct, capped, counts, strict=True)}
        return [by_query[q][0] for q in queries], [by_query[q][1] for q in queries]

    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """Encode pair ``i`` = ``(queries[i], documents[i])``; callers pass validated input.

        Split over crossrank's threads (module docstring); ``cancel`` stops it between
        chunks with ``concurrent.futures.CancelledError``. ``instruction`` is there for the
        prompts of decoder rerankers (:meth:`check_instruction`): here it must be ``None``.
        """
        self.check_instruction(instruction)
        queries = scrub_surrogates(queries)
        documents = list(documents)  # surrogates are scrubbed after the cut
        if not documents:
            return EncodedPairs.concat([])
        capped, counts = self._capped(queries)
        rooms = [self.max_length - n - self.special_tokens_in_pair for n in counts]

        def chunk(lo: int, hi: int) -> EncodedPairs:
            encodings = self._encode_pairs(capped[lo:hi], documents[lo:hi], rooms[lo:hi])
            type_ids = [e.type_ids for e in encodings] if self.returns_type_ids else None
            return self._flat([e.ids for e in encodings], type_ids)

        return EncodedPairs.concat(split_call(chunk, len(documents), cancel))

    def _encode_pairs(
        self, queries: list[str], documents: list[str], rooms: list[int]
    ) -> list[Encoding]:
        """The Rust tokenizer's encodings of the pairs, documents cut to their ``rooms``.

        Calls the backend directly, with the truncation that ``tokenizer(queries, documents,
        truncation="only_second", max_length=max_length)`` sets: the same ids, without the
        Python-side conversion of every encoding (about a third of the time; measured in
        ``benchmarks/gpu_peers.py --micro``). Offsets are not computed.
        """

        def encode(chosen: list[int], cut: list[str]) -> list[Encoding]:
            pairs = [(queries[i], text) for i, text in zip(chosen, cut, strict=True)]
            with self._backend.using((self.max_length, 0)) as backend:
                return list(_fast_encode(backend)(pairs))

        needs = rooms if self._cuts else [None] * len(rooms)
        return encode_cut(documents, needs, encode, lambda _, e: document_tokens(e, 0))

    def encode_windows(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        window_tokens: int | None,
        overlap: int | None,
        max_windows: int | None = None,
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """Encode each pair as one row per document window (``pair_index``/``spans`` set).

        A window holds up to ``window_tokens`` document tokens (``None``: all the room
        ``max_length`` leaves after the capped query) and starts ``overlap`` tokens
        (``None``: an eighth of the window) before the previous one ends. A document that
        fits in one window gives exactly the row :meth:`encode` gives. Only a document's
        first ``max_windows`` windows are kept (``None``: all), and its text is cut to what
        they need. The fast tokenizer cuts the windows itself (truncation with a stride and
        overflowing encodings) in one call per window layout and chunk; pairs whose queries
        have the same token count share a layout. ``instruction`` as in :meth:`encode`.
        """
        self.check_instruction(instruction)
        queries = scrub_surrogates(queries)
        documents = list(documents)  # surrogates are scrubbed after the cut
        if not documents:
            return no_windows()
        capped, _ = self._capped(queries)
        distinct = list(dict.fromkeys(capped))
        counted = self._encode_texts(distinct, None, offsets=False)
        fixed = {
            q: len(e.ids) + self.special_tokens_in_pair
            for q, e in zip(distinct, counted, strict=True)
        }

        def chunk(lo: int, hi: int) -> EncodedPairs:
            layouts: dict[tuple[int, int], list[int]] = {}
            for i in range(lo, hi):
                room, stride = window_layout(
                    self.max_length - fixed[capped[i]], window_tokens, overlap
                )
                layouts.setdefault((fixed[capped[i]] + room, stride), []).append(i)
            parts = [
                self._windows(layout, members, capped, documents, fixed, max_windows)
                for layout, members in layouts.items()
            ]
            return EncodedPairs.concat(parts)

        return EncodedPairs.concat(split_call(chunk, len(documents), cancel))

    def _windows(
        self,
        layout: tuple[int, int],
        members: list[int],
        queries: list[str],
        documents: list[str],
        fixed: dict[str, int],
        max_windows: int | None,
    ) -> EncodedPairs:
        """The window rows of the pairs ``members`` that share one layout."""
        max_length, stride = layout

        def encode(chosen: list[int], cut: list[str]) -> list[Encoding]:
            pairs = [(queries[members[k]], text) for k, text in zip(chosen, cut, strict=True)]
            with self._backend.using(layout) as backend:
                return list(backend.encode_batch(pairs))

        needs: list[int | None] = []
        for i in members:
            room = max_length - fixed[queries[i]]
            covered = None if max_windows is None else windows_cover(room, stride, max_windows)
            needs.append(covered if self._cuts else None)
        docs = [documents[i] for i in members]
        encodings = encode_cut(docs, needs, encode, lambda _, e: document_tokens(e, stride))
        windows, pair_index = [], []
        for i, encoding in zip(members, encodings, strict=True):
            rows = [encoding, *encoding.overflowing][:max_windows]
            windows.extend(rows)
            pair_index.extend([i] * len(rows))
        type_ids = [w.type_ids for w in windows] if self.returns_type_ids else None
        flat = self._flat([w.ids for w in windows], type_ids)
        spans = np.array([_document_span(w) for w in windows], dtype=np.int64).reshape(-1, 2)
        return EncodedPairs(
            flat.ids, flat.offsets, flat.lengths, flat.type_ids,
            np.asarray(pair_index, dtype=np.int64), spans,
        )  # fmt: skip

    def _flat(self, input_ids: list[list[int]], type_ids: list[list[int]] | None) -> EncodedPairs:
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(input_ids), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(lengths.sum())
        flat_types = _flatten(type_ids, total) if type_ids is not None else None
        return EncodedPairs(_flatten(input_ids, total), offsets, lengths, flat_types)


def no_windows() -> EncodedPairs:
    """What windowing no pairs gives: no rows, with (empty) ``pair_index`` and ``spans``."""
    none = np.zeros(0, np.int64)
    return EncodedPairs(none, none, none, None, none, np.zeros((0, 2), np.int64))


def window_layout(room: int, window_tokens: int | None, overlap: int | None) -> tuple[int, int]:
    """``(window, stride)`` for a pair that leaves ``room`` document tokens: a window holds up
    to ``window_tokens`` of them (``None``: all the room) and starts ``overlap`` tokens
    (``None``: an eighth of the window) before the previous one ends.

    The stride is kept below the window (the Rust tokenizer panics unless stride < window);
    engine settings guarantee it, this keeps it true even if a capped query re-tokenizes a
    token longer.
    """
    if window_tokens is not None:
        room = min(room, window_tokens)
    stride = room // 8 if overlap is None else overlap
    return room, max(0, min(stride, room - 1))


def windows_cover(window: int, stride: int, max_windows: int) -> int:
    """Document tokens the first ``max_windows`` windows of a ``(window, stride)`` layout
    cover (what a document is cut to before tokenizing)."""
    return (max_windows - 1) * (window - stride) + window


def _fast_encode(backend: Tokenizer) -> Any:
    """``encode_batch_fast`` (no character offsets) where this tokenizers version has it."""
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


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
