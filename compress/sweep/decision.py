"""What a sweep decides: which candidate ships, by the budget, on the split that chooses.

- `pick()`: the decision, on the target's numbers (by rules.py's budget and front); the
  accuracy budget counts from the dense model's accuracy in PyTorch (the model the user
  has), by the paired difference on val.
- `decide()`: the pick, or when none is within the budget what ships instead (the
  fastest whose interval still reaches the budget, else the most accurate): a run
  always ends with a file, and says when it missed.
- `present()`: the table, sweep.png and the decision said in a line.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from compress.measure.intervals import budget_points, describe_difference
from compress.sweep.rules import may_lose_more, pareto, reaches
from compress.sweep.report import (SweepRow, in_pytorch, plot_sweep, print_sweep,
                                   reference_accuracy)

# a sweep decides on val (where the students were chosen epoch by epoch too) and reports
# on test where the split holds one: the figures a user reads were never chosen on
SELECTION_SPLIT = "val"


def drop(row: SweepRow, dense: SweepRow) -> float:
    """The points a measured row is below the dense model in PyTorch on the pictures the
    sweep decides on: the paired difference (the same pictures, "budget"), or, for a row
    measured before there were paired differences, the difference of the two accuracies."""
    if "budget" not in row:
        return 100 * (reference_accuracy(dense) - row["accuracy"])
    return -100 * row["budget"]["difference"]


def pick(rows: Sequence[SweepRow], dense: SweepRow, max_drop: float) -> SweepRow | None:
    """The fastest row (batch-1 latency; fewer parameters on a tie) at most `max_drop` points
    below the dense model in PyTorch, by the paired difference on val (drop()). Rows of
    one architecture (the same parameters and FLOPs: l1-0.9 and taylor-0.9 keep the same
    widths) are one network, whose latencies differ by timing noise alone: of them, the
    most accurate counts."""
    best_of_shape = {}
    for row in rows:
        if round(drop(row, dense), 9) <= max_drop:
            shape = (row["params"], row.get("flops"))
            if shape not in best_of_shape or \
                    drop(row, dense) < drop(best_of_shape[shape], dense):
                best_of_shape[shape] = row
    return min(best_of_shape.values(), key=lambda r: (r["latency_ms"], r["params"]),
               default=None)


def decide(rows: Sequence[SweepRow], dense: SweepRow,
           max_drop: float) -> dict[str, SweepRow | None]:
    """What a budget decides (on val): {"picked": pick() (None if no row is within the
    budget), "fastest_in_noise": the fastest row whose paired interval reaches the budget,
    "most_accurate": the row of the best paired difference, "shipped": the pick, else the
    fastest in the noise, else the most accurate}. A run always ends with a file to ship;
    where the budget was missed it says so, and the file's name says so too."""
    in_noise = [row for row in rows if reaches(row["budget"], max_drop)] \
        if all("budget" in row for row in rows) else []
    decision = {"picked": pick(rows, dense, max_drop),
                "fastest_in_noise": min(in_noise, key=lambda r: (r["latency_ms"], r["params"]),
                                        default=None),
                "most_accurate": min(rows, key=lambda r: (drop(r, dense), r["latency_ms"]),
                                     default=None)}
    decision["shipped"] = (decision["picked"] or decision["fastest_in_noise"]
                           or decision["most_accurate"])
    return decision


def mark_pareto(rows: Sequence[SweepRow]) -> None:
    """Each row's pareto_latency and pareto_params: on the accuracy/latency (parameters)
    front."""
    for key in ("latency_ms", "params"):
        front = pareto(rows, key)
        for row in rows:
            row[f"pareto_{key.split('_')[0]}"] = row["name"] in front


def present(rows: list[SweepRow], dense: SweepRow, max_drop: float | None,
            output_dir: str) -> SweepRow | None:
    """Mark, print and draw the measured rows; returns the row to ship (None without a
    budget): decide()'s, each row marked "picked" (within the budget) and "shipped"."""
    decision = decide(rows, dense, max_drop) if max_drop is not None else {}
    for row in rows:
        row["picked"] = row is decision.get("picked")
        row["shipped"] = row is decision.get("shipped")
    print_sweep(rows, dense)
    plot_sweep(rows, dense, os.path.join(output_dir, "sweep.png"), max_drop)
    if max_drop is None:
        return None
    chosen, shipped = decision["picked"], decision["shipped"]
    if chosen:
        reference = reference_accuracy(dense)
        against = in_pytorch(dense)
        print(f"--max-drop {max_drop:g} (decided on {SELECTION_SPLIT}): {chosen['name']} "
              f"({chosen['file']}): {chosen['accuracy']:.1%} on {chosen['split']} vs dense "
              f"{reference:.1%} (PyTorch), {describe_difference(chosen['difference'])}, "
              f"{dense['params'] / chosen['params']:.1f}x fewer parameters, "
              f"{against['latency_ms'] / chosen['latency_ms']:.1f}x faster at batch 1 and "
              f"{against['file_bytes'] / chosen['file_bytes']:.1f}x smaller than the dense "
              "model in PyTorch")
    else:
        fastest, best = decision["fastest_in_noise"], decision["most_accurate"]
        print(f"--max-drop {max_drop:g} (decided on {SELECTION_SPLIT}): no setting is within "
              f"{budget_points(max_drop)} of the dense model. "
              + (f"The fastest whose interval reaches the budget: {fastest['name']} "
                 f"({describe_difference(fastest['budget'])}); " if fastest else
                 "No interval reaches the budget; ")
              + f"the most accurate: {best['name']} ({describe_difference(best['budget'])}). "
              f"Shipped: {shipped['name']}, marked as over the budget.")
    print_noise(rows, chosen, max_drop)
    return shipped


def print_noise(rows: Sequence[SweepRow], chosen: SweepRow | None, max_drop: float) -> None:
    """Say where the budget's decision is within the noise: faster settings left out whose
    interval on val still reaches the budget, and a pick whose interval crosses it."""
    line = -max_drop / 100
    rows = [row for row in rows if "budget" in row]
    faster = [row for row in rows if row["budget"]["high"] >= line > row["budget"]["difference"]
              and (chosen is None or row["latency_ms"] < chosen["latency_ms"])]
    if faster:
        print("Within the noise: " + ", ".join(
            f"{row['name']} ({describe_difference(row['budget'])} on {SELECTION_SPLIT})"
            for row in faster) + f" left out, though their intervals reach -{max_drop:g}: "
            "more validation pictures would tell")
    if chosen and "budget" in chosen and may_lose_more(chosen["budget"], max_drop):
        print(f"{chosen['name']}'s interval on {SELECTION_SPLIT} "
              f"({describe_difference(chosen['budget'])}) reaches below -{max_drop:g}: it may "
              "lose more than the budget")
