"""Tokenization CPU time per pair for long documents, before and after the cut.

crossrank cuts a document's text, before tokenizing, to what the pair can use
(:mod:`crossrank.tokenization`). This measures what that buys: tokenization CPU time per
(query, document) pair with the real XLM-R tokenizer (bge-reranker-v2-m3, from
``$CROSSRANK_SHARED`` or ``../shared``) at ``max_length=512`` for English documents of 512
tokens and of 2k, 8k, 32k and 1M characters (XQuAD-R paragraphs joined), as a ratio to the
512-token documents. "before" tokenizes the full text (the Rust tokenizer's truncating pair
call, what crossrank did until the cut); "after" is ``PairTokenizer.encode``. CPU time is
``time.process_time`` (every thread of the process; the fastest of repeated calls), so it
does not depend on how many cores run it; the bar is "after" within 1.3x of the 512-token documents however long.

    python benchmarks/tokenize_cost.py                  # the table (about a minute)
    python benchmarks/tokenize_cost.py --chars-per-token   # the measured constant's source
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from crossrank.testing import SKELETON, shared_dir
from crossrank.tokenization import PairTokenizer

QUERY = "Which river flows through the city?"
SIZES = {"2k chars": 2_000, "8k chars": 8_000, "32k chars": 32_000, "1M chars": 1_000_000}


def paragraphs(shared: Path, lang: str) -> list[str]:
    data = json.loads((shared / f"data/xquad-r/{lang}.json").read_text(encoding="utf-8"))
    return list(dict.fromkeys(p["context"] for a in data["data"] for p in a["paragraphs"]))


def chars_per_token(shared: Path, tokenizer) -> None:
    """Print the distribution that CHARS_PER_TOKEN is chosen from."""
    for lang in ("en", "zh"):
        texts = paragraphs(shared, lang)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ratio = np.array([len(t) / len(i) for t, i in zip(texts, ids, strict=True)])
        p50, p90, p99 = np.percentile(ratio, [50, 90, 99])
        print(
            f"{lang}: {len(texts)} paragraphs, chars/token mean {ratio.mean():.2f} "
            f"p50 {p50:.2f} p90 {p90:.2f} p99 {p99:.2f} max {ratio.max():.2f}"
        )


def documents(texts: list[str], size: int, count: int) -> list[str]:
    """``count`` documents of ``size`` characters, paragraphs joined from different starts."""
    docs = []
    for k in range(count):
        parts, length, i = [], 0, k * 7
        while length < size:
            parts.append(texts[i % len(texts)])
            length += len(parts[-1]) + 1
            i += 1
        docs.append(" ".join(parts)[:size])
    return docs


def cpu_per_pair(fn: Callable[[], object], pairs: int, min_seconds: float = 0.5) -> float:
    """CPU seconds per pair of ``fn``: the fastest of the calls made in ``min_seconds``
    after one warm-up (the least disturbed by other work on a shared machine)."""
    fn()
    times: list[float] = []
    while sum(times) < min_seconds or len(times) < 3:
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times) / pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars-per-token", action="store_true")
    parser.add_argument("--pairs", type=int, default=50, help="documents per call")
    args = parser.parse_args(argv)
    shared = shared_dir()
    if shared is None:
        parser.error("the shared assets are missing: set CROSSRANK_SHARED")
    hf = AutoTokenizer.from_pretrained(shared / SKELETON)
    if args.chars_per_token:
        chars_per_token(shared, hf)
        return 0
    texts = paragraphs(shared, "en")
    encoder = PairTokenizer(hf, max_length=512, query_max_length=384)
    backend = hf.backend_tokenizer
    queries = [QUERY] * args.pairs
    long_text = documents(texts, 40_000, args.pairs)
    base = [encoder.cap_documents([doc], 512 - 15)[0] for doc in long_text]  # 512-token pairs

    def before(docs: list[str]) -> Callable[[], object]:
        pairs = list(zip(queries, docs, strict=False))

        def run() -> object:
            backend.enable_truncation(512, strategy="only_second")
            return backend.encode_batch_fast(pairs)

        return run

    rows = [("512 tokens", base)] + [
        (name, documents(texts, n, args.pairs)) for name, n in SIZES.items()
    ]
    ref_before = cpu_per_pair(before(base), args.pairs)
    ref_after = cpu_per_pair(lambda: encoder.encode(queries, base), args.pairs)
    print("| document | before: ms/pair | ratio | after: ms/pair | ratio |")
    print("|---|---|---|---|---|")
    for name, docs in rows:
        few = max(2, min(len(docs), 400_000 // max(len(d) for d in docs)))  # full text is slow
        b = cpu_per_pair(before(docs[:few]), few)
        a = cpu_per_pair(lambda docs=docs: encoder.encode(queries, docs), args.pairs)
        print(
            f"| {name} | {b * 1e3:.3f} | {b / ref_before:.2f}x | {a * 1e3:.3f} | "
            f"{a / ref_after:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
