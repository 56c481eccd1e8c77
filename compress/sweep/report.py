"""A sweep's report: its rows, its table, its figure, and the dense figures its budget counts
from.

- `SweepRow`: a setting's row of sweep.json (the dense model's too): a measured model's
  figures and what the sweep adds to them.
- `in_pytorch()` / `reference_accuracy()`: the dense model as the user has it (PyTorch),
  from which --max-drop counts.
- `print_sweep()`: the table, in the runtime that decided, against the dense model.
- `plot_sweep()`: accuracy against latency and against parameters, the Pareto front.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from compress.measure.evaluation import ModelRow
from compress.measure.intervals import PairedDifference
from compress.measure.reporting import (accuracy_cell, difference_cell, print_loose_timings,
                                        pyplot, save_figure)
from compress.sweep.targets import TARGETS

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class SweepRow(ModelRow, total=False):
    """A row of sweep.json: the model measured in the target runtime (ModelRow), and

    Args:
        method, global, sparsity, steps, latency_target_ms: the setting (dense: none).
        training: what it was distilled with, whole (candidates.comparable_training()).
        minutes: its pruning and distillation took; target, file: the runtime that
            decided and the file it measured; pytorch: the same figures in PyTorch;
            accuracy_by_runtime: its accuracy in each runtime measured.
        budget: the paired difference from the dense model in PyTorch on val (decided on).
        picked, pareto_latency, pareto_params: the decisions; predicted_ms: the latency
            model's prediction, where there was one.
    """
    method: str
    sparsity: float | None
    steps: int
    latency_target_ms: float | None
    training: dict
    minutes: float
    target: str
    file: str
    pytorch: dict
    accuracy_by_runtime: dict[str, float]
    budget: PairedDifference
    picked: bool
    pareto_latency: bool
    pareto_params: bool
    predicted_ms: float


def in_pytorch(dense: SweepRow) -> SweepRow:
    """The dense model's figures in PyTorch (its row itself where PyTorch decided)."""
    return dense.get("pytorch", dense)


def reference_accuracy(dense: SweepRow, split: str | None = None) -> float:
    """The accuracy a sweep's budget counts from: the dense model's in PyTorch (on `split`;
    None: the split it reports on)."""
    figures = in_pytorch(dense)
    return figures["accuracy"] if split is None else figures["by_split"][split]["accuracy"]


def print_sweep(rows: Sequence[SweepRow], dense: SweepRow) -> None:
    """The sweep's table: the dense row, then each setting's (p: Pareto front, *: picked),
    in the runtime that decided, each accuracy with its 95% interval and against the
    dense model in PyTorch on the same pictures; beside it, with a target other than
    PyTorch, how many times faster and smaller than the dense model in PyTorch each is."""
    against = dense.get("pytorch")
    split = dense.get("split", "val")
    header = (f"{'setting':<24}{'epochs':>8}{split + ' acc [95%]':>22}{'vs dense [95%]':>23}"
              f"{'params':>9}"
              f"{'x fewer':>8}{'FLOPs':>9}{'latency b=1':>13}{'IQR':>6}{'x faster':>9}"
              f"{'img/s b=32':>11}"
              + (f"{'x faster than':>14}{'x smaller':>10}" if against else ""))
    print(f"\nMeasured on {dense['device']} with {dense['threads']} threads; CPU: "
          f"{dense['cpu']}\nDecided by {TARGETS[dense.get('target', 'pytorch')].name}"
          + (f"; the last two columns against the dense model in PyTorch "
             f"({against['latency_ms']:.2f} ms, {against['file_bytes'] / 2**20:.1f} MB, "
             f"{against['accuracy']:.1%}), from which the budget counts" if against else "")
          + f"\n{header}\n{'-' * len(header)}")
    for row in [dense, *rows]:
        mark = "*" if row.get("picked") else "p" if row.get("pareto_latency") else ""
        print(f"{row['name'][:21] + ' ' + mark:<24}{epochs_cell(row):>8}{accuracy_cell(row):>22}"
              f"{difference_cell(row):>23}"
              f"{row['params'] / 1e6:>8.2f}M{dense['params'] / row['params']:>7.1f}x"
              f"{row['flops'] / 1e9:>8.3f}G{row['latency_ms']:>11.2f}ms"
              f"{row['latency_iqr_ms']:>6.2f}{dense['latency_ms'] / row['latency_ms']:>8.1f}x"
              f"{row['throughput_ips']:>11.0f}"
              + (f"{against['latency_ms'] / row['latency_ms']:>13.1f}x"
                 f"{against['file_bytes'] / row['file_bytes']:>9.1f}x" if against else ""))
    print(f"(accuracy on {dense.get('val_images')} pictures of {split}, Wilson's 95% interval; "
          "vs dense: points against the dense model in PyTorch on the same pictures, paired "
          "bootstrap 95% interval, '=': cannot be told apart from it; p: on the "
          "accuracy/latency Pareto front; *: picked by --max-drop, on val)")
    print_loose_timings([dense, *rows])
    predicted = [row for row in [dense, *rows] if "predicted_ms" in row]
    if predicted:
        errors = [(row["predicted_ms"] - row["latency_ms"]) / row["latency_ms"]
                  for row in predicted]
        print("The latency model's batch-1 predictions against the measured latency: "
              + ", ".join(f"{row['name']} {row['predicted_ms']:.2f}/{row['latency_ms']:.2f} ms "
                          f"({error:+.0%})" for row, error in zip(predicted, errors))
              + f"; largest error {max(map(abs, errors)):.0%}")


def epochs_cell(row: SweepRow) -> str:
    """A row's distillation epochs: '5+20' where successive halving continued it."""
    stages = [stage["epochs"] for stage in row.get("stages") or []]
    return "+".join(map(str, stages)) if stages else str(row.get("epochs", ""))


def plot_sweep(rows: Sequence[SweepRow], dense: SweepRow, path: str,
               max_drop: float | None) -> None:
    """Two panels against the batch-1 latency in the runtime that decided: each setting's
    paired difference from the dense model on val, where the --max-drop budget is decided
    (drawn there); and each setting's accuracy on the split reported (test, where the split
    has one), the Pareto front and the dense model marked."""
    plt = pyplot()
    figure, (decided, reported) = plt.subplots(1, 2, figsize=(13, 5.5))
    latencies = [row["latency_ms"] for row in rows]
    with_budget = [row for row in rows if "budget" in row]
    if with_budget:
        differences = [100 * row["budget"]["difference"] for row in with_budget]
        decided.errorbar([row["latency_ms"] for row in with_budget], differences,
                         yerr=[[d - 100 * row["budget"]["low"] for d, row in
                                zip(differences, with_budget)],
                               [100 * row["budget"]["high"] - d for d, row in
                                zip(differences, with_budget)]],
                         fmt="o", color="C0", ecolor="0.6", capsize=3, zorder=3)
        for row, difference in zip(with_budget, differences):
            decided.annotate(label_of(row), (row["latency_ms"], difference), fontsize=8,
                             textcoords="offset points", xytext=(5, 4))
    decided.axhline(0, color="0.6", linewidth=0.8)
    if max_drop is not None:
        decided.axhline(-max_drop, color="C3", linestyle=":", label=f"--max-drop {max_drop:g}")
        decided.legend(loc="lower right", fontsize=8)
    decided.set(ylabel="val accuracy minus the dense model's in PyTorch (points)",
                title="Decided here: paired difference on val, 95% intervals")
    front = sorted((row for row in rows if row.get("pareto_latency")),
                   key=lambda row: row["latency_ms"])
    reported.plot([row["latency_ms"] for row in front], [100 * row["accuracy"] for row in front],
                  "-", color="C1", label="Pareto front")
    reported.errorbar(latencies, [100 * row["accuracy"] for row in rows], yerr=errors(rows),
                      fmt="o", color="C0", ecolor="0.6", capsize=3, zorder=3)
    reported.scatter([dense["latency_ms"]], [100 * dense["accuracy"]], marker="*", s=200,
                     color="C3", zorder=3, label="dense")
    for row in rows:
        reported.annotate(label_of(row), (row["latency_ms"], 100 * row["accuracy"]), fontsize=8,
                          textcoords="offset points", xytext=(5, 4))
    split = dense.get("split", "val")
    reported.set(ylabel=f"{split} accuracy (%), 95% interval",
                 title=f"Reported: accuracy on {split}")
    reported.legend(loc="lower right", fontsize=8)
    for axis in (decided, reported):
        log_latency_axis(axis)
    figure.suptitle(f"Decided by {TARGETS[dense.get('target', 'pytorch')].name}, measured on "
                    f"{dense['device']} ({dense.get('cpu_class', '')}), {dense['threads']} "
                    f"threads, {dense['image_size']} px", fontsize=10)
    save_figure(figure, path)


def label_of(row: SweepRow) -> str:
    """A point's label: its name, its epochs where they were staged, and its decision."""
    stages = [stage["epochs"] for stage in row.get("stages") or []]
    return (row["name"] + (f" ({'+'.join(map(str, stages))} ep.)" if len(stages) > 1 else "")
            + (" picked" if row.get("picked") else " shipped" if row.get("shipped") else ""))


def log_latency_axis(axis: Axes) -> None:
    """A log latency axis labelled at 1, 2, 5 x 10^k ms (no crowded minor labels), and at
    its minor ticks too where it spans less than a factor of 4 (else a single label)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(value, _):
        low, high = axis.get_xlim()
        return f"{value:g}" if high < 4 * low else ""
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(FuncFormatter(minor))
    axis.set_xlabel("latency at batch 1 (ms, log scale)")


def errors(rows: Sequence[SweepRow]) -> list[list[float]]:
    """The rows' 95% intervals as matplotlib's error bars (below, above), in points."""
    return [[100 * (row["accuracy"] - row.get("accuracy_low", row["accuracy"])) for row in rows],
            [100 * (row.get("accuracy_high", row["accuracy"]) - row["accuracy"]) for row in rows]]
