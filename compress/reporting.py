"""What the user reads and looks at: the tables printed and the figures saved.

- `pyplot()` / `save_figure()`: matplotlib without a window unless asked (--show),
  and the one way every figure is saved and closed.
- Figures: `plot_history()` (a training run's curves), `plot_channels()` (widths
  before and after pruning), `plot_confusion()`, `plot_prediction()` (one picture and
  its class), `plot_comparison()` (test.py --compare), `plot_sweep()` (accuracy
  against latency and parameters, the Pareto front).
- Tables: `print_comparison()` (test.py --compare) and `print_sweep()`.
- `save_comparison()`: what test.py --compare leaves on disk (its JSON report, its
  figure beside it, a confusion matrix beside each model's file).

The rows these take are those of comparison.compare() and the sweep's.
"""
from __future__ import annotations

from collections.abc import Sequence

import os
from typing import TYPE_CHECKING

from compress.checkpoints import output_path, write_json
from compress.timing import PRECISION

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image


def pyplot(show: bool = False):
    """matplotlib.pyplot, with a file-only backend unless a window was asked for (--show)."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure: Figure, path: str, show: bool = False, **options) -> None:
    """Save `figure` to `path` (100 dpi), then show it (--show) or close it."""
    plt = pyplot(show)
    if "bbox_inches" not in options:
        figure.tight_layout()
    figure.savefig(path, dpi=100, **options)
    plt.show() if show else plt.close(figure)


def plot_history(history: Sequence[dict], path: str, title: str) -> None:
    """A training run's loss and accuracy per epoch (the records of training.fit)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (objective)")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation (cross-entropy)")
    left.set(title=f"{title}: loss", xlabel="epoch", ylabel="loss")
    right.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train")
    right.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", label="validation")
    right.set(title=f"{title}: accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def plot_channels(names: Sequence[str], before: Sequence[int], after: Sequence[int], path: str,
                  recipe: str) -> None:
    """Output channels (units) of each layer before and after pruning, on a log scale."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 4))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], before, width=0.4, label="dense")
    axis.bar([p + 0.2 for p in positions], after, width=0.4, label="pruned")
    axis.set_xticks(list(positions), names, rotation=45)
    axis.set_yscale("log", base=2)
    axis.set(ylabel="output channels / units", title=f"Channels per layer, {recipe}")
    axis.legend()
    save_figure(figure, path)


def plot_confusion(metrics: dict, class_names: Sequence[str], path: str, title: str,
                   show: bool = False) -> None:
    """The confusion matrix of evaluation.evaluate()'s `metrics`, counts in the cells."""
    plt = pyplot(show)
    size = max(4, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    confusion = metrics["confusion"]
    axis.imshow(confusion, cmap="Blues")
    darkest = max(max(counts) for counts in confusion)
    for row, counts in enumerate(confusion):
        for column, count in enumerate(counts):
            axis.text(column, row, count, ha="center", va="center",
                      color="white" if count > darkest / 2 else "black")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set(xlabel="predicted", ylabel="true", title=f"{title}: {metrics['accuracy']:.1%}")
    save_figure(figure, path, show)


def plot_prediction(image: Image.Image, label: str, path: str, show: bool = False) -> None:
    """One picture (a PIL image) under its predicted class."""
    plt = pyplot(show)
    figure, axis = plt.subplots(figsize=(5, 5.4))
    axis.imshow(image)
    axis.set_title(label)
    axis.axis("off")
    save_figure(figure, path, show, bbox_inches="tight")


def print_comparison(rows: Sequence[dict]) -> None:
    """test.py --compare's table: each row against the first."""
    base = rows[0]
    width = max(10, *(len(row["name"]) for row in rows))  # the model column fits every name
    header = (f"{'model':<{width}} {'val acc':>8} {'params':>14} {'FLOPs':>14} {'file size':>14} "
              f"{'latency b=1 (IQR)':>24} {'throughput b=32':>18}")
    print(f"\nMeasured on {base['device']} with {base['threads']} threads (PyTorch in "
          "channels-last, .onnx files in onnxruntime), timed interleaved, median and "
          f"interquartile range; ratios against {base['name']}\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(f"{row['name']:<{width}} {row['accuracy']:>8.1%} "
              f"{row['params'] / 1e6:>6.1f}M {row['params'] / base['params']:>5.2f}x "
              f"{row['flops'] / 1e9:>6.2f}G {row['flops'] / base['flops']:>5.2f}x "
              f"{row['file_bytes'] / 2**20:>6.1f}MB "
              f"{row['file_bytes'] / base['file_bytes']:>5.2f}x "
              f"{row['latency_ms']:>7.1f}ms ({row['latency_iqr_ms']:>5.2f}) "
              f"{base['latency_ms'] / row['latency_ms']:>5.2f}x↑ "
              f"{row['throughput_ips']:>7.1f}img/s "
              f"{row['throughput_ips'] / base['throughput_ips']:>5.2f}x↑")
    print("(x: model / first model; x↑: speed-up over the first model)")
    print_loose_timings(rows)
    print()


def print_loose_timings(rows: Sequence[dict]) -> None:
    """Name the rows whose medians are known less well than PRECISION, if any."""
    loose = [row["name"] for row in rows if row["timing_uncertainty"] > PRECISION]
    if loose:
        print(f"The medians of {', '.join(loose)} are known only to more than {PRECISION:.0%} "
              "(IQR / sqrt(runs)) after --max-repeats runs: the machine was busy; compare them "
              "with care, or time them again")


def plot_comparison(rows: Sequence[dict], path: str, show: bool = False) -> None:
    """test.py --compare's bars: accuracy, parameters, file size, latency, throughput."""
    plt = pyplot(show)
    names = [row["name"] for row in rows]
    panels = [("val accuracy (%)", [100 * r["accuracy"] for r in rows]),
              ("parameters (M)", [r["params"] / 1e6 for r in rows]),
              ("file size (MB)", [r["file_bytes"] / 2**20 for r in rows]),
              ("latency, batch 1 (ms)", [r["latency_ms"] for r in rows]),
              ("throughput, batch 32 (img/s)", [r["throughput_ips"] for r in rows])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
        axis.bar_label(bars, fmt=lambda value: f"{value:.3g}" if value < 1000 else f"{value:.0f}")
        axis.set_title(title)
    figure.suptitle(f"Measured on {rows[0]['device']}, {rows[0]['threads']} threads, "
                    f"{rows[0]['image_size']} px")
    save_figure(figure, path, show)


def save_comparison(rows: Sequence[dict], report: str, show: bool = False) -> str:
    """`rows` (comparison.compare()'s) as the JSON `report`, its figure beside it (returned)
    and each model's confusion matrix beside its file (<file>.confusion.png)."""
    for row in rows:
        plot_confusion(row, row["class_names"], output_path(row["path"], "confusion.png"),
                       row["name"], show)
    write_json(rows, report)
    figure = os.path.splitext(report)[0] + ".png"
    plot_comparison(rows, figure, show)
    return figure


def print_sweep(rows: Sequence[dict], dense: dict) -> None:
    """The sweep's table: the dense row, then each setting's (p: Pareto front, *: picked)."""
    header = (f"{'setting':<30}{'val acc':>9}{'params':>10}{'x fewer':>9}{'FLOPs':>9}"
              f"{'latency b=1':>14}{'IQR':>7}{'x faster':>10}{'img/s b=32':>12}")
    print(f"\n{header}\n{'-' * len(header)}")
    for row in [dense, *rows]:
        mark = "*" if row.get("picked") else "p" if row.get("pareto_latency") else ""
        print(f"{row['name'][:27] + ' ' + mark:<30}{row['accuracy']:>9.1%}"
              f"{row['params'] / 1e6:>9.2f}M{dense['params'] / row['params']:>8.1f}x"
              f"{row['flops'] / 1e9:>8.3f}G{row['latency_ms']:>12.2f}ms"
              f"{row['latency_iqr_ms']:>7.2f}{dense['latency_ms'] / row['latency_ms']:>9.1f}x"
              f"{row['throughput_ips']:>12.0f}")
    print("(p: on the accuracy/latency Pareto front; *: picked by --max-drop)")
    print_loose_timings([dense, *rows])


def plot_sweep(rows: Sequence[dict], dense: dict, path: str, max_drop: float | None) -> None:
    """Accuracy against latency and against parameters, the Pareto front, the dense model
    and the --max-drop budget."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, key, label, scale in [(axes[0], "latency_ms", "latency, batch 1 (ms)", 1),
                                    (axes[1], "params", "parameters (M)", 1e6)]:
        front = sorted((r for r in rows if r[f"pareto_{key.split('_')[0]}"]), key=lambda r: r[key])
        axis.plot([r[key] / scale for r in front], [100 * r["accuracy"] for r in front], "-",
                  color="C1", label="Pareto front")
        axis.scatter([r[key] / scale for r in rows], [100 * r["accuracy"] for r in rows],
                     color=["C1" if r in front else "C0" for r in rows], zorder=3)
        axis.scatter([dense[key] / scale], [100 * dense["accuracy"]], marker="*", s=200,
                     color="C3", zorder=3, label="dense")
        if max_drop is not None:
            axis.axhline(100 * dense["accuracy"] - max_drop, color="C3", linestyle=":",
                         label=f"--max-drop {max_drop:g}")
        for row in rows:
            axis.annotate(row["name"] + (" (picked)" if row.get("picked") else ""),
                          (row[key] / scale, 100 * row["accuracy"]), fontsize=8,
                          textcoords="offset points", xytext=(4, 4))
        axis.set_xscale("log")
        axis.set(xlabel=label + " (log)", ylabel="val accuracy (%)")
        axis.legend()
    figure.suptitle(f"Sweep measured on {dense['device']}, {dense['threads']} threads, "
                    f"{dense['image_size']} px")
    save_figure(figure, path)
