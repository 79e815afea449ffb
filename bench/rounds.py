"""Arms timed against each other in rounds on a shared, noisy machine: the order they run in, and
the ratios a benchmark reports.

A load that rises or falls through a round costs the arm timed last in it more (or less) than the
first: timed in the same order every round (A B C, A B C, ...), a drift biased every ratio toward
the arm measured last. `balanced_order` reverses the order every other round (A B C, C B A, ...),
so that over each pair of rounds every arm has the same mean place and a steady drift hits them
alike. `ratio_rounds` gives each round's ratio of two arms, their median, min and max, so that a
reader sees how far the rounds spread (in every benchmark that reports a ratio).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def balanced_order(arms: Iterable, rounds: int) -> Iterator[tuple[int, object]]:
    """(round, arm) in the order to time them: the arms as given in even rounds, reversed in odd."""
    arms = list(arms)
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            yield r, arm


def ratio_rounds(numerators: Sequence[float], denominators: Sequence[float], digits: int = 3) -> dict:
    """Each round's numerator over its denominator (two arms' figures from the same rounds), and
    the median, min and max of those ratios."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"ratios of {len(numerators)} and {len(denominators)} rounds")
    ratios = [float(a) / float(b) for a, b in zip(numerators, denominators)]
    return {
        "ratios": [round(x, digits) for x in ratios],
        "median": round(float(np.median(ratios)), digits),
        "min": round(min(ratios), digits),
        "max": round(max(ratios), digits),
    }
