"""Tokenization CPU time per pair for long documents, before and after the cut.

crossrank cuts a document's text, before tokenizing, to what the pair can use
(:mod:`crossrank.tokenization`). This measures what that buys: tokenization CPU time per
(query, document) pair with the real XLM-R tokenizer (bge-reranker-v2-m3, from
``$CROSSRANK_SHARED`` or ``../shared``) at ``max_length=512``, 50 pairs a call, for
documents of 512 tokens and of 2k to 1M characters (XQuAD-R paragraphs joined), English and
Chinese, as a ratio to the 512-token documents of the same language. "before" tokenizes the
full text (the Rust tokenizer's truncating pair call, what crossrank did until the cut);
"after" is ``PairTokenizer.encode``. The bar: "after" within 1.3x of the 512-token documents,
however long.

CPU time is ``time.process_time`` (every thread of the process), so it does not depend on
how many cores run it. On a shared machine one call's CPU time still moves by +-30 % (caches
and cores shared with other work), so the cases take turns call by call, in a new random
order each round, and the "after" ratio is the median, over the rounds, of a call's CPU time
over that of the reference call of its round: the most stable of the estimators tried
(over four blocks of 50 rounds of one run it stayed within +-3 %, the ratio of the calls'
10th percentiles within +-7 %, that of the fastest calls within +-4 %). The table also
gives the 10th-90th percentile of those same-round ratios and the ratio of the 10th
percentiles; a second, identical 512-token row shows how far noise alone moves a ratio.
ms/pair are the 10th percentile of the calls.

    python benchmarks/tokenize_cost.py                     # the table (about a minute of CPU)
    python benchmarks/tokenize_cost.py --chars-per-token   # the measured constants' source
"""

from __future__ import annotations

import argparse
import functools
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
REF, AGAIN = "512 tokens", "512 tokens (again)"
PERCENTILE = 10
SIZES = {
    "en": {"2k chars": 2_000, "8k chars": 8_000, "32k chars": 32_000, "1M chars": 1_000_000},
    "zh": {"8k chars": 8_000, "1M chars": 1_000_000},
}
#: Characters of full text per "before" call: long documents are slow uncut, so fewer per call.
BEFORE_CHARS = 400_000


def paragraphs(shared: Path, lang: str) -> list[str]:
    data = json.loads((shared / f"data/xquad-r/{lang}.json").read_text(encoding="utf-8"))
    return list(dict.fromkeys(p["context"] for a in data["data"] for p in a["paragraphs"]))


def chars_per_token(shared: Path, tokenizer) -> None:
    """Print the distributions that CHARS_PER_TOKEN and DENSE_CHARS_PER_TOKEN are chosen
    from: characters per token of single paragraphs, and their real token count over the
    cut's estimate (below 1: the first cut would be too short)."""
    # Imported here: the table also runs against a crossrank older than these constants.
    from crossrank.tokenization import CHARS_PER_TOKEN, DENSE_CHARS_PER_TOKEN, DENSE_FROM

    for lang in ("en", "zh"):
        texts = paragraphs(shared, lang)
        counts = np.array([len(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]])
        chars = np.array([len(t) for t in texts])
        dense = np.array([sum(ord(c) >= DENSE_FROM for c in t) for t in texts])
        ratio = chars / counts
        p50, p90, p99 = np.percentile(ratio, [50, 90, 99])
        real = counts / ((chars - dense) / CHARS_PER_TOKEN + dense / DENSE_CHARS_PER_TOKEN)
        print(
            f"{lang}: {len(texts)} paragraphs, {dense.sum() / chars.sum():.0%} dense characters; "
            f"chars/token mean {ratio.mean():.2f} p50 {p50:.2f} p90 {p90:.2f} p99 {p99:.2f} "
            f"max {ratio.max():.2f}; real/estimated tokens mean {real.mean():.2f} "
            f"p1 {np.percentile(real, 1):.2f} min {real.min():.2f}"
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


def table(
    after: dict[str, np.ndarray], before: dict[str, tuple[np.ndarray, int]], pairs: int
) -> str:
    """Markdown table: ms/pair and the ratio to the 512-token documents of the same language
    (cases are named "LANG SIZE"), before and after the cut, with the spread of the after
    ratio."""
    lines = [
        "| document | before: ms/pair | ratio | after: ms/pair | ratio (median) "
        "| same-round ratios p10-p90 | ratio of 10th percentiles |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, calls in after.items():
        ref = f"{name.split()[0]} {REF}"
        cells = ["-", "-"]
        if name in before:
            b = low(*before[name])
            cells = [f"{b * 1e3:.3f}", f"{b / low(*before[ref]):.2f}x"]
        same_round = calls / after[ref]
        spread = np.percentile(same_round, [10, 90])
        cells += [
            f"{low(calls, pairs) * 1e3:.3f}",
            f"{np.median(same_round):.2f}x",
            f"{spread[0]:.2f}-{spread[1]:.2f}x",
            f"{low(calls, pairs) / low(after[ref], pairs):.2f}x",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def workload(shared: Path, encoder: PairTokenizer, pairs: int) -> dict[str, list[str]]:
    """The documents of each case, by name: 512-token documents (long ones capped to 497
    tokens, which with the query fill 512) and the sizes of ``SIZES``, per language."""
    docs: dict[str, list[str]] = {}
    for lang, sizes in SIZES.items():
        texts = paragraphs(shared, lang)
        long_text = documents(texts, 40_000, pairs)
        docs[f"{lang} {REF}"] = [encoder.cap_documents([d], 512 - 15)[0] for d in long_text]
        docs |= {f"{lang} {name}": documents(texts, n, pairs) for name, n in sizes.items()}
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars-per-token", action="store_true")
    parser.add_argument("--pairs", type=int, default=50, help="documents per call")
    parser.add_argument("--rounds", type=int, default=80, help="calls per case, after the cut")
    parser.add_argument("--rounds-before", type=int, default=3, help="calls per case, full text")
    args = parser.parse_args(argv)
    shared = shared_dir()
    if shared is None:
        parser.error("the shared assets are missing: set CROSSRANK_SHARED")
    hf = AutoTokenizer.from_pretrained(shared / SKELETON)
    if args.chars_per_token:
        chars_per_token(shared, hf)
        return 0
    encoder = PairTokenizer(hf, max_length=512, query_max_length=384)
    docs = workload(shared, encoder, args.pairs)
    queries = [QUERY] * args.pairs
    backend = AutoTokenizer.from_pretrained(shared / SKELETON).backend_tokenizer  # its own
    backend.enable_truncation(512, strategy="only_second")

    def full_text(texts: list[str]) -> Callable[[], object]:
        pairs = list(zip(queries, texts, strict=False))
        return lambda: backend.encode_batch_fast(pairs)

    few = {n: max(2, min(args.pairs, BEFORE_CHARS // max(map(len, d)))) for n, d in docs.items()}
    full = {name: full_text(d[: few[name]]) for name, d in docs.items()}
    before = {name: (c, few[name]) for name, c in interleaved(full, args.rounds_before).items()}
    cases: dict[str, Callable[[], object]] = {}
    for name, d in docs.items():
        cases[name] = functools.partial(encoder.encode, queries, d)
        if name == f"en {REF}":  # the same call again: how far noise alone moves a ratio
            cases[f"en {AGAIN}"] = cases[name]
    print(table(interleaved(cases, args.rounds), before, args.pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
