"""How sure an accuracy is: its 95% interval, and two models compared on the same pictures.

- `accuracy_interval()`: Wilson's score interval of an accuracy measured on n pictures
  (it stays inside 0..1 and is honest near 100%, where the normal one is not).
- `paired_difference()`: model B's accuracy minus model A's on the same pictures, with a
  95% interval from a seeded paired bootstrap (the pictures resampled, both models'
  answers kept together) and McNemar's exact p-value: only the pictures on which the
  two disagree say anything about which is better.

Two independent intervals overlap far more often than the models differ; the paired
difference is the figure to decide by (a 90%-pruned student and its teacher agree on
most pictures, so their difference is known much better than either accuracy).
"""
from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
RESAMPLES = 10_000


class PairedDifference(typing.TypedDict):
    """Model B against model A on the same pictures (paired_difference()).

    Args:
        difference: B's accuracy minus A's (a share: 0.012 is 1.2 points).
        low, high: its 95% interval (paired bootstrap).
        p_value: McNemar's exact two-sided p-value.
        only_a, only_b: the pictures only A, only B got right.
        count: the pictures.
    """
    difference: float
    low: float
    high: float
    p_value: float
    only_a: int
    only_b: int
    count: int


def accuracy_interval(correct: int, count: int) -> tuple[float, float]:
    """The 95% Wilson score interval of `correct` hits out of `count` pictures."""
    if count == 0:
        return 0.0, 1.0
    share = correct / count
    scale = 1 + Z95 ** 2 / count
    centre = (share + Z95 ** 2 / (2 * count)) / scale
    half = Z95 * math.sqrt(share * (1 - share) / count + Z95 ** 2 / (4 * count ** 2)) / scale
    # (at 0 or all correct the interval touches that edge exactly, not a rounding from it)
    return (0.0 if correct == 0 else max(0.0, centre - half),
            1.0 if correct == count else min(1.0, centre + half))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: `only_a` pictures only A got right, `only_b` only B."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    fewer = min(only_a, only_b)
    tail = sum(math.comb(discordant, k) for k in range(fewer + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


def paired_difference(hits_a: Sequence[int], hits_b: Sequence[int],
                      seed: int = 0) -> PairedDifference:
    """B's accuracy minus A's on the same pictures (`hits_*`: 1 where right, in the same
    order): {"difference", "low", "high" (its 95% interval, paired bootstrap), "p_value"
    (McNemar), "only_a", "only_b" (pictures only one of them got right), "count"}."""
    a, b = np.asarray(hits_a, dtype=np.int8), np.asarray(hits_b, dtype=np.int8)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired answers must be on the same pictures ({a.size} vs {b.size})")
    step = (b - a).astype(np.float64)
    generator = np.random.default_rng(seed)
    means = np.empty(RESAMPLES)
    for start in range(0, RESAMPLES, 1000):  # (in chunks: 1000 x n indices at a time)
        picks = generator.integers(0, a.size, size=(min(1000, RESAMPLES - start), a.size))
        means[start:start + len(picks)] = step[picks].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return {"difference": float(step.mean()), "low": float(low), "high": float(high),
            "p_value": mcnemar_p(only_a, only_b), "only_a": only_a, "only_b": only_b,
            "count": int(a.size)}


def tells_apart(difference: PairedDifference) -> bool:
    """Whether the paired interval excludes 0: the two models measurably differ."""
    return not difference["low"] <= 0 <= difference["high"]


def points(value: float) -> str:
    """An accuracy difference in points, signed: +1.2, -0.3."""
    return f"{100 * value:+.1f}"


def budget_points(max_drop: float) -> str:
    """A budget of `max_drop` points, as a sentence says it: '1 point', '2.5 points'."""
    return f"{max_drop:g} point{'' if max_drop == 1 else 's'}"


def describe_difference(difference: PairedDifference) -> str:
    """'-0.8 points [-1.9, +0.2]': a paired difference and its 95% interval."""
    return (f"{points(difference['difference'])} points "
            f"[{points(difference['low'])}, {points(difference['high'])}]")
