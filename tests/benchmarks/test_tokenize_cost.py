"""benchmarks/tokenize_cost.py's measurement: cases take turns, ratios are per round."""

from __future__ import annotations

import numpy as np
from benchmarks.tokenize_cost import interleaved, table


def test_cases_take_turns_in_a_new_order_every_round() -> None:
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = interleaved(cases, rounds=30)
    assert calls[:4] == list("abcd")  # one warm-up call each, not timed
    rounds = [calls[4 + 4 * k : 8 + 4 * k] for k in range(30)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every case once a round
    assert len({tuple(r) for r in rounds}) > 5  # in changing orders
    assert all(len(t) == 30 and (t >= 0).all() for t in times.values())


def test_the_ratio_is_the_median_of_same_round_ratios() -> None:
    ref = np.array([1.0, 4.0, 2.0, 8.0, 3.0])
    after = {"en 512 tokens": ref, "en 1M chars": ref * np.array([1.2, 1.1, 1.3, 1.2, 1.25])}
    before = {"en 512 tokens": (np.full(3, 0.5), 50), "en 1M chars": (np.full(3, 10.0), 2)}
    rows = {
        line.split(" | ")[0]: line.split(" | ") for line in table(after, before, 50).splitlines()
    }
    ref_row, long_row = rows["| en 512 tokens"], rows["| en 1M chars"]
    assert ref_row[4] == "1.00x"
    assert long_row[4] == "1.20x"  # though the calls take 1 to 8 units from round to round
    assert long_row[2] == f"{(10.0 / 2) / (0.5 / 50):.2f}x"  # per pair, fewer pairs a call
