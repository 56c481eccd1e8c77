"""What the user reads and looks at: the tables printed and the figures saved.

- `pyplot()` / `save_figure()`: matplotlib without a window unless asked (--show),
  and the one way every figure is saved and closed.
- Figures: `plot_history()` (a training run's curves), `plot_channels()` (widths
  before and after pruning), `plot_confusion()`, `plot_prediction()` (one picture and
  its class), `plot_comparison()` (test.py --compare).
- Tables: `print_comparison()` (test.py --compare); `print_loose_timings()`.
- Profiles (test.py --profile): `print_profile()`, a model's layers against the
  machine's peak; `explain_profiles()`, each model's speed-up against the first, and
  why; `plot_profiles()`, stacked bars of the layers' times.
- `save_comparison()`: what test.py --compare leaves on disk (its JSON report, its
  figure beside it, a confusion matrix beside each model's file).

The rows these take are those of comparison.compare() and the sweep's (whose own
table and figure are in sweep/report.py).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from compress.checkpoints import output_path, write_json
from compress.measure.timing import PRECISION

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from compress.measure.evaluation import ModelRow
    from compress.measure.profiling import Profile


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


def accuracy_cell(row: ModelRow) -> str:
    """'86.4% [84.0, 88.6]': an accuracy and its 95% interval, in percent."""
    if "accuracy_low" not in row:  # (a row measured before intervals were)
        return f"{row['accuracy']:.1%}"
    return (f"{row['accuracy']:.1%} [{100 * row['accuracy_low']:.1f}, "
            f"{100 * row['accuracy_high']:.1f}]")


def difference_cell(row: ModelRow) -> str:
    """'-0.8 [-1.9, +0.2]': a row's paired difference from the first row, in points, its
    95% interval, '=' where it cannot be told apart from the first ('' for the first)."""
    difference = row.get("difference")
    if not difference:
        return ""
    cell = (f"{100 * difference['difference']:+.1f} [{100 * difference['low']:+.1f}, "
            f"{100 * difference['high']:+.1f}]")
    return cell + (" =" if difference["low"] <= 0 <= difference["high"] else "  ")


def print_comparison(rows: Sequence[ModelRow]) -> None:
    """test.py --compare's table: each row against the first."""
    base = rows[0]
    width = max(10, *(len(row["name"]) for row in rows))  # the model column fits every name
    split = base.get("split", "val")
    header = (f"{'model':<{width}} {split + ' acc [95%]':>21} {'vs first [95%]':>22} "
              f"{'params':>14} {'FLOPs':>14} {'file size':>14} "
              f"{'latency b=1 (IQR)':>24} {'throughput b=32':>18}")
    print(f"\nMeasured on {base['device']} with {base['threads']} threads (PyTorch in "
          "channels-last, .onnx files in onnxruntime), timed interleaved, median and "
          f"interquartile range; ratios against {base['name']}\nCPU: {base['cpu']}\n"
          f"{header}\n{'-' * len(header)}")
    for row in rows:
        print(f"{row['name']:<{width}} {accuracy_cell(row):>21} {difference_cell(row):>22} "
              f"{row['params'] / 1e6:>6.1f}M {row['params'] / base['params']:>5.2f}x "
              f"{row['flops'] / 1e9:>6.2f}G {row['flops'] / base['flops']:>5.2f}x "
              f"{row['file_bytes'] / 2**20:>6.1f}MB "
              f"{row['file_bytes'] / base['file_bytes']:>5.2f}x "
              f"{row['latency_ms']:>7.1f}ms ({row['latency_iqr_ms']:>5.2f}) "
              f"{base['latency_ms'] / row['latency_ms']:>5.2f}x↑ "
              f"{row['throughput_ips']:>7.1f}img/s "
              f"{row['throughput_ips'] / base['throughput_ips']:>5.2f}x↑")
    print(f"(accuracy on {base.get('val_images')} pictures of {split}, Wilson's 95% interval; vs "
          "first: accuracy points minus the first model's on the same pictures, paired "
          "bootstrap 95% interval, '=': cannot be told apart; x: model / first model; "
          "x↑: speed-up over the first model)")
    print_loose_timings(rows)
    print_zeros(rows)
    print()


def print_zeros(rows: Sequence[ModelRow]) -> None:
    """For the rows of single weights pruned (their size compressed is known): their share
    of zero weights and their file raw and compressed, where zeros pay."""
    first = rows[0]
    for row in rows:
        if row.get("zipped_bytes"):
            smaller = first["file_bytes"] / row["zipped_bytes"]
            print(f"{row['name']}: {row['zero_weights']:.1%} of its weights are zero; its file "
                  f"{row['file_bytes'] / 2**20:.1f} MB, {row['zipped_bytes'] / 2**20:.1f} MB "
                  f"compressed (deflate, as zip does: {smaller:.1f}x smaller than "
                  f"{first['name']}'s file)")


def print_loose_timings(rows: Sequence[ModelRow]) -> None:
    """Name the rows whose medians are known less well than PRECISION, if any."""
    loose = [row["name"] for row in rows if row["timing_uncertainty"] > PRECISION]
    if loose:
        print(f"The medians of {', '.join(loose)} are known only to more than {PRECISION:.0%} "
              "(IQR / sqrt(runs)) after --max-repeats runs: the machine was busy; compare them "
              "with care, or time them again")


def plot_comparison(rows: Sequence[ModelRow], path: str, show: bool = False) -> None:
    """test.py --compare's bars: accuracy, parameters, file size, latency, throughput."""
    plt = pyplot(show)
    names = [row["name"] for row in rows]
    panels = [(f"{rows[0].get('split', 'val')} accuracy (%)", [100 * r["accuracy"] for r in rows]),
              ("parameters (M)", [r["params"] / 1e6 for r in rows]),
              ("file size (MB)", [r["file_bytes"] / 2**20 for r in rows]),
              ("latency, batch 1 (ms)", [r["latency_ms"] for r in rows]),
              ("throughput, batch 32 (img/s)", [r["throughput_ips"] for r in rows])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
        axis.bar_label(bars, fmt=lambda value: f"{value:.3g}" if value < 1000 else f"{value:.0f}")
        axis.set_title(title)
    first = rows[0]
    cpu = f" ({first['cpu_class']})" if first["device"] == "cpu" and "cpu_class" in first else ""
    figure.suptitle(f"Measured on {first['device']}{cpu}, {first['threads']} threads, "
                    f"{first['image_size']} px")
    save_figure(figure, path, show)


def save_comparison(rows: Sequence[ModelRow], report: str, show: bool = False) -> str:
    """`rows` (comparison.compare()'s) as the JSON `report`, its figure beside it (returned)
    and each model's confusion matrix beside its file (<file>.confusion.png)."""
    for row in rows:
        plot_confusion(row, row["class_names"], output_path(row["path"], "confusion.png"),
                       row["name"], show)
    write_json(rows, report)
    figure = os.path.splitext(report)[0] + ".png"
    plot_comparison(rows, figure, show)
    return figure


def print_profile(profile: Profile, peak: float) -> None:
    """One model's profile: a line per layer (time, multiply-adds, GMAC/s and the share of
    the machine's `peak` GMAC/s), then its kinds of layers together."""
    measured = profile.measured
    print(f"\n{profile.name} ({profile.path}; {profile.runtime}, {profile.precision}, batch "
          f"{profile.batch}, {profile.image_size} px): {measured * 1000:.2f} ms a pass "
          f"({profile.profiled * 1000:.2f} under the profiler); its layers add up to "
          f"{profile.seconds() * 1000:.2f} ms ({profile.seconds() / measured:.0%})")
    header = (f"{'layer':<22}{'kind':<15}{'time ms':>9}{'share':>7}{'MMACs':>9}{'GMAC/s':>9}"
              f"{'of peak':>9}")
    print(f"{header}\n{'-' * len(header)}")
    rows = profile.layers if len(profile.layers) <= 24 else []  # MobileNetV2: by kind only
    for layer in rows:
        print(layer_line(layer.name[:21], layer.kind, layer.seconds, layer.macs, measured, peak))
    kinds = sorted({layer.kind for layer in profile.layers} - {"other"}) + ["other"]
    if rows:
        print("-" * len(header))
    for kind in kinds:
        count = sum(layer.kind == kind for layer in profile.layers)
        print(layer_line(f"all {kind}" if rows else kind,
                         "" if kind == "other" else f"{count} layers", profile.seconds(kind),
                         profile.macs(kind), measured, peak))
    unaccounted = measured - profile.seconds()
    print(f"{'outside every layer':<37}{unaccounted * 1000:>9.2f}{unaccounted / measured:>7.0%}"
          "   (the framework between layers, and the profiler's own cost)")


def layer_line(name: str, kind: str, seconds: float, macs: int, measured: float,
               peak: float) -> str:
    """A row of print_profile()."""
    rate = macs / seconds / 1e9 if seconds and macs else 0.0
    return (f"{name:<22}{kind:<15}{seconds * 1000:>9.2f}{seconds / measured:>7.0%}"
            + (f"{macs / 1e6:>9.1f}{rate:>9.1f}{rate / peak:>9.1%}" if macs else ""))


def explain_profiles(profiles: Sequence[Profile], peak: dict) -> None:
    """Each model against the first at the same batch: how much less it computes, how
    much faster it is, and why the two differ -- the speed of its layers against the
    first's, and the time outside its compute layers."""
    print("\nWhy (each model against the first, at the same batch size):")
    first_of = {}
    for profile in profiles:
        first = first_of.setdefault(profile.batch, profile)
        if profile is first:
            continue
        own, theirs = compute_figures(profile), compute_figures(first)
        peak_of = peak["int8" if profile.precision == "int8" else "fp32"]
        slowest = min((kind for kind in {layer.kind for layer in profile.layers} - {"other"}
                       if profile.seconds(kind) >= 0.2 * profile.measured),
                      key=lambda kind: profile.macs(kind) / profile.seconds(kind), default=None)
        print(f"- {profile.name} vs {first.name}, batch {profile.batch}: "
              f"{first.macs() / profile.macs():.2f}x fewer multiply-adds, "
              f"{first.measured / profile.measured:.2f}x faster. Its compute layers run at "
              f"{own['rate']:.1f} GMAC/s ({own['rate'] / peak_of:.0%} of this machine's "
              f"{peak_of:.0f}) against {theirs['rate']:.1f}; outside them it spends "
              f"{own['outside'] * 1000:.2f} ms ({own['outside'] / profile.measured:.0%} of its "
              f"pass) against {theirs['outside'] * 1000:.2f} ms."
              + (f" Its slowest kind of layer, {slowest}: "
                 f"{profile.seconds(slowest) / profile.measured:.0%} of its time for "
                 f"{profile.macs(slowest) / profile.macs():.0%} of its multiply-adds, at "
                 f"{profile.macs(slowest) / profile.seconds(slowest) / 1e9:.1f} GMAC/s."
                 if slowest else ""))


def compute_figures(profile: Profile) -> dict:
    """The compute layers' GMAC/s together, and the seconds of a pass outside them."""
    compute = profile.seconds() - profile.seconds("other")
    return {"rate": profile.macs() / compute / 1e9 if compute else 0.0,
            "outside": profile.measured - compute}


def plot_profiles(profiles: Sequence[Profile], path: str, show: bool = False) -> None:
    """Above, stacked bars, one per model and batch size: each compute layer's time (the
    same colour for the same layer), then "other", then what lies outside every layer.
    Below, layer by layer, each model's time side by side: where the milliseconds went
    from the first model to the others."""
    plt = pyplot(show)
    batches = sorted({profile.batch for profile in profiles})
    figure, axes = plt.subplots(2, len(batches), figsize=(7 * len(batches), 10), squeeze=False)
    names = []
    for profile in profiles:
        names += [layer.name for layer in profile.layers if layer.name not in names]
    colours = {name: plt.cm.tab20(index % 20) for index, name in enumerate(names)}
    colours["other"] = "0.6"
    for axis, batch in zip(axes[0], batches):
        shown = [p for p in profiles if p.batch == batch]
        for position, profile in enumerate(shown):
            bottom = 0.0
            for layer in profile.layers:
                axis.bar(position, layer.seconds * 1000, bottom=bottom, color=colours[layer.name],
                         edgecolor="white", linewidth=0.3)
                bottom += layer.seconds * 1000
            axis.bar(position, max(0.0, profile.measured * 1000 - bottom), bottom=bottom,
                     color="none", edgecolor="0.3", hatch="//", linewidth=0.5)
        axis.set_xticks(range(len(shown)), [p.name for p in shown], rotation=20)
        axis.set(ylabel="ms per pass", title=f"batch {batch}: each layer's time (hatched: "
                                             "outside every layer)")
        plot_layer_by_layer(axes[1][batches.index(batch)], shown, batch)
    figure.suptitle(f"Where the time goes, {profiles[0].image_size} px")
    figure.tight_layout()
    save_figure(figure, path, show)


def plot_layer_by_layer(axis: Axes, profiles: Sequence[Profile], batch: int) -> None:
    """Grouped bars: for each layer (of the first profile, then others'), each model's time."""
    names = []
    for profile in profiles:
        names += [layer.name for layer in profile.layers if layer.name not in names]
    width = 0.8 / len(profiles)
    for index, profile in enumerate(profiles):
        times = {layer.name: layer.seconds * 1000 for layer in profile.layers}
        axis.bar([position + index * width for position in range(len(names))],
                 [times.get(name, 0.0) for name in names], width, label=profile.name)
    axis.set_xticks([position + 0.4 - width / 2 for position in range(len(names))], names,
                    rotation=90, fontsize=7)
    axis.set(ylabel="ms per pass", title=f"batch {batch}: layer by layer, each model")
    axis.legend(fontsize=7)
