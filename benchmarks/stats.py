"""Paired ratios of two paths timed side by side, a distribution-free interval for their median, and the verdict a
timing target gets from it (README.md: "Statistics")."""

from __future__ import annotations

import math
import statistics
from typing import Any


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratios(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """Per-repeat ratios of two figures timed side by side in each repeat, with their median and range.

    Each repeat times both paths together (alternating batches or steps), so a change in the machine's load hits
    both alike: the median of the paired ratios is much less sensitive to it than the ratio of the two medians (on
    this 2-core shared machine, part 2's medians have moved by 20% between repeats)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "median": median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "median_interval_90": median_interval(ratios),
        "per_repeat": ratios,
    }


def median_interval(values: list[float], level: float = 0.90) -> list[float] | None:
    """A distribution-free confidence interval for the median: the k-th smallest and k-th largest values, k the
    largest for which the median of the distribution lies between them with probability >= `level` (the count of
    values below the median is Binomial(n, 1/2)). None where there are too few values (under 5 at 90%).

    9 values give the 2nd and 8th (96%); 11 give the 3rd and 9th (93%); 18 give the 6th and 13th (90.4%)."""
    n, ordered = len(values), sorted(values)
    best = None
    for k in range(1, n // 2 + 1):
        outside = 2 * sum(math.comb(n, i) for i in range(k)) / 2**n  # P(the median is below the k-th or above)
        if 1 - outside < level:
            break
        best = k
    return None if best is None else [ordered[best - 1], ordered[n - best]]


def ratio_verdict(ratios: dict[str, Any], threshold: float = 1.0) -> str:
    """`met` or `not met` where the median's 90% interval is on one side of `threshold`; `within noise` where the
    interval holds it (the repeats cannot tell). Without an interval (too few repeats), the median alone decides."""
    interval = ratios.get("median_interval_90")
    low, high = interval if interval else (ratios["median"], ratios["median"])
    if low >= threshold:
        return "met"
    if high < threshold:
        return "not met"
    return "within noise"
