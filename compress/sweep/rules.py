"""The rules a sweep's choices follow, in plain Python (no torch: NNI's advisor process,
nni_halving.py, imports them and must connect to NNI's manager within its 10 seconds).

- `within_budget()` / `reaches()` / `may_lose_more()`: a student against the --max-drop
  budget, by its accuracy or its paired difference's interval.
- `pareto()`: the settings no other beats in both cost and accuracy.
- `survivors()`: which settings successive halving continues (halving.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def within_budget(accuracy: float, dense_accuracy: float, max_drop: float) -> bool:
    """Whether `accuracy` is at most `max_drop` points below the dense model's (a student
    exactly at the budget is within it, whatever the floating-point rounding)."""
    return round(100 * (dense_accuracy - accuracy), 9) <= max_drop


def pareto(rows: Sequence[dict], key: str) -> set[str]:
    """Names of the rows no other row beats in both `key` (lower) and accuracy (higher)."""
    front, best = set(), -1.0
    for row in sorted(rows, key=lambda r: (r[key], -r["accuracy"])):
        if row["accuracy"] > best:
            front.add(row["name"])
            best = row["accuracy"]
    return front


def reaches(difference: dict, max_drop: float) -> bool:
    """Whether a paired difference's interval (its "high" end, a fraction) reaches a budget
    of `max_drop` points below the dense model."""
    return round(difference["high"] + max_drop / 100, 9) >= 0


def may_lose_more(difference: dict, max_drop: float) -> bool:
    """Whether a paired difference's interval (its "low" end) goes further below the dense
    model than the budget of `max_drop` points."""
    return difference["low"] < -max_drop / 100


def survivors(standings: dict[str, dict], max_drop: float | None) -> list[str]:
    """The names (of {name: standing()}) that continue: half of them, rounded up, all from
    the front of accuracy against cost (a setting less accurate than another that costs no
    more never continues). First those whose interval reaches the budget, the cheapest
    first; the places left (all of them, where none reaches it yet: after a short stage
    the students are still far from what more epochs bring) to the most accurate of the
    front. Without a budget, the most accurate of the front."""
    keep = math.ceil(len(standings) / 2)
    front = pareto([{"name": name, "flops": entry["flops"],
                     "accuracy": entry["vs_dense"]["difference"]}
                    for name, entry in standings.items()], "flops")
    kept = [] if max_drop is None else sorted(
        (name for name in front if reaches(standings[name]["vs_dense"], max_drop)),
        key=lambda name: (standings[name]["flops"], name))[:keep]
    by_accuracy = sorted(front, key=lambda name: (-standings[name]["vs_dense"]["difference"],
                                                  name))
    return kept + [name for name in by_accuracy if name not in kept][:keep - len(kept)]
