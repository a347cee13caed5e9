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
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from crossrank.testing import SKELETON, shared_dir
from crossrank.tokenization import PairTokenizer

QUERY = "Which river flows through the city?"
REF, AGAIN = "512 tokens", " (again)"
PERCENTILE = 10
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


def interleaved(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, np.ndarray]:
    """CPU seconds of each of ``rounds`` calls of each case. The cases take turns, in a new
    random order every round, so that other work on a shared machine slows every case alike
    rather than whichever ran while it did; one warm-up call each first."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order, rng = list(cases), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.process_time()
            cases[name]()
            times[name].append(time.process_time() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def low(calls: np.ndarray, pairs: int) -> float:
    """CPU seconds per pair at the 10th percentile of the calls: those least slowed by other
    work, and less of a lucky draw than the fastest one."""
    return float(np.percentile(calls, PERCENTILE)) / pairs


def table(after: dict[str, np.ndarray], before: dict[str, tuple[np.ndarray, int]], pairs: int):
    """Markdown table: ms/pair and ratio to the 512-token documents before and after the
    cut, with the spread of the after ratio (from the fastest calls, and the 10th-90th
    percentile of each call's ratio to the reference call of its round)."""
    ref_after = low(after[REF], pairs)
    ref_before = low(*before[REF])
    lines = [
        "| document | before: ms/pair | ratio | after: ms/pair | ratio "
        "| ratio of fastest calls | same-round ratios p10-p90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, calls in after.items():
        cells = ["-", "-"]
        if name in before:
            b = low(*before[name])
            cells = [f"{b * 1e3:.3f}", f"{b / ref_before:.2f}x"]
        a = low(calls, pairs)
        spread = np.percentile(calls / after[REF], [10, 90])
        cells += [
            f"{a * 1e3:.3f}",
            f"{a / ref_after:.2f}x",
            f"{calls.min() / after[REF].min():.2f}x",
            f"{spread[0]:.2f}-{spread[1]:.2f}x",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars-per-token", action="store_true")
    parser.add_argument("--pairs", type=int, default=50, help="documents per call")
    parser.add_argument("--rounds", type=int, default=100, help="calls per size, after the cut")
    parser.add_argument("--rounds-before", type=int, default=3, help="calls per size, full text")
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
    backend = AutoTokenizer.from_pretrained(shared / SKELETON).backend_tokenizer  # its own
    backend.enable_truncation(512, strategy="only_second")
    queries = [QUERY] * args.pairs
    long_text = documents(texts, 40_000, args.pairs)
    docs = {REF: [encoder.cap_documents([doc], 512 - 15)[0] for doc in long_text]}
    docs |= {name: documents(texts, n, args.pairs) for name, n in SIZES.items()}

    def full_text(pairs: list[tuple[str, str]]) -> Callable[[], object]:
        return lambda: backend.encode_batch_fast(pairs)

    # The full text of a long document is slow: fewer of them per call.
    few = {name: max(2, min(args.pairs, 400_000 // max(map(len, d)))) for name, d in docs.items()}
    full = {
        name: full_text(list(zip(queries[: few[name]], d[: few[name]], strict=True)))
        for name, d in docs.items()
    }
    before = {name: (c, few[name]) for name, c in interleaved(full, args.rounds_before).items()}
    cases = {name: (lambda d=d: encoder.encode(queries, d)) for name, d in docs.items()}
    cases[REF + AGAIN] = cases[REF]  # the same call again: how far noise moves a ratio
    after = interleaved(cases, args.rounds)
    print(table(after, before, args.pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
