"""Widths chosen for a latency: the channels that matter most per millisecond they cost.

HALP's idea (Shen et al., NeurIPS 2022) with a greedy in place of its knapsack: start
from the dense widths and, while the latency model (latency.py) predicts more than the
target, take away the group of channels whose value is least per millisecond its
removal saves, anywhere in the network. The time saved is the whole model's predicted
time before and after, so what a layer's width does to the next layer's time counts. A
layer whose channels cost much time thins first, each channel it loses worth more than
the last; one whose channels cost little keeps them.

Bounds: widths move in multiples of the step the kernels favour
(latency.favoured_step()) down to one step, then a channel at a time; no layer keeps
fewer than FLOOR of its channels; and no layer keeps less than 1/NEIGHBOUR_RATIO of the
share its neighbours keep (a layer fed by few channels costs little at any width: on
flowers, an allocation without it kept 512-channel layers fed by 16-channel ones).

- `channel_values()`: what each layer's channels are worth to the allocation: a layer
  of w channels about log(w) (its k-th channel 1/k); which channels of a layer go is the
  pruning method's choice.
- `allocate()`: the widths for a target, and the predicted latency they reach.
- `uniform_for()`: the uniform sparsity whose widths the model predicts at a target
  (what the allocation is held against).
- `describe_allocation()`: each layer's width, the share of its value kept and its
  predicted time, a column each for the allocated and the uniform widths.
- `allocation_for()`: what pruner.py and the sweep run: the allocation for a target,
  the uniform cut of the same predicted latency, and the table of both.
"""
from __future__ import annotations

import typing

from compress.cli import UserError
from compress.pruning.channels import uniform_widths
from compress.pruning.latency import LatencyModel, layers_of, widths_of, with_widths
from model import Architecture

FLOOR = 0.05  # a layer keeps at least this share of its channels
NEIGHBOUR_RATIO = 2.0  # and at least 1 / this of the share each neighbour keeps


def channel_values(architecture: Architecture) -> dict[str, list[float]]:
    """{layer: its channels' values, least first}: the k-th channel of a layer (most
    important first, by the pruning method's own ranking) is worth 1/k, so a layer of w
    channels is worth about log(w). Thinning a layer costs more the thinner it already is,
    and no layer is given up for the others. (Measured against the methods' own scores
    made comparable across layers, Taylor's loss change and norms over their layer's
    mean: docs/latency.md.)"""
    return {name: [1.0 / rank for rank in range(width, 0, -1)]
            for name, width in widths_of(architecture).items()}


def narrower(width: int, step: int, least: int) -> int | None:
    """The next width down from `width`: a step less while that leaves at least one step,
    then a channel less; None below `least`."""
    smaller = width - step if width - step >= step else width - 1
    return smaller if smaller >= max(least, 1) else None


def allocate(latency: LatencyModel, architecture: Architecture, importance: dict[str, list[float]],
             target_ms: float, step: int = 1) -> tuple[dict[str, int], float]:
    """(widths, predicted ms): the dense `architecture` thinned, the channels of least
    `importance` (channel_values()) per millisecond saved first (see the module: steps,
    FLOOR, NEIGHBOUR_RATIO), until `latency` predicts at most `target_ms`. UserError if
    even the narrowest widths allowed stay above it."""
    dense = widths_of(architecture)
    names = list(dense)
    widths = {name: width - width % step if width > step else width
              for name, width in dense.items()}
    least = narrowest(architecture)
    predicted = latency.predict(with_widths(architecture, widths))
    while predicted > target_ms:
        best, best_ratio, best_time = None, None, None
        for position, name in enumerate(names):
            smaller = narrower(widths[name], step, least[name])
            neighbours = names[max(0, position - 1):position] + names[position + 1:position + 2]
            if smaller is None or any(smaller / dense[name] * NEIGHBOUR_RATIO
                                      < widths[other] / dense[other] for other in neighbours):
                continue
            trial = dict(widths, **{name: smaller})
            time = latency.predict(with_widths(architecture, trial))
            saved = predicted - time
            # the least important channels still kept in this layer, those that go
            kept = importance[name][len(importance[name]) - widths[name]:]
            cost = sum(kept[:widths[name] - smaller])
            ratio = cost / saved if saved > 0 else float("inf")
            if best_ratio is None or ratio < best_ratio:
                best, best_ratio, best_time = name, ratio, time
        if best is None or best_time >= predicted:
            raise UserError(f"--latency {target_ms:g} ms: below what any allowed widths reach "
                            f"here (at least {reachable_ms(latency, architecture):.2f} "
                            f"ms predicted, every layer at {FLOOR:.0%} of its channels)")
        widths[best] = narrower(widths[best], step, least[best])
        predicted = best_time
    return widths, predicted


def narrowest(architecture: Architecture) -> dict[str, int]:
    """The narrowest widths an allocation may leave: FLOOR of each layer's channels, one at
    least."""
    return {name: max(1, round(FLOOR * width)) for name, width in widths_of(architecture).items()}


def reachable_ms(latency: LatencyModel, architecture: Architecture) -> float:
    """The least latency `latency` predicts for an allocation."""
    return latency.predict(with_widths(architecture, narrowest(architecture)))


def uniform_for(latency: LatencyModel, architecture: Architecture, target_ms: float,
                iterations: int = 30) -> tuple[float, dict[str, int], float]:
    """(sparsity, widths, predicted ms) of the uniform sparsity predicted nearest to
    `target_ms` from below (bisection over 0..0.99)."""
    dense = widths_of(architecture)
    low, high = 0.0, 0.99
    for _ in range(iterations):
        middle = (low + high) / 2
        time = latency.predict(with_widths(architecture, uniform_widths(dense, middle)))
        low, high = (low, middle) if time <= target_ms else (middle, high)
    widths = uniform_widths(dense, high)
    return high, widths, latency.predict(with_widths(architecture, widths))


def target_of(latency: LatencyModel, architecture: Architecture, latency_ms: float | None,
              speedup: float | None) -> float:
    """The target in ms of --latency MS or --speedup X (against the dense model's predicted
    time), refused in one line where no pruning can reach it or none is needed."""
    dense_ms = latency.predict(architecture)
    target = latency_ms if latency_ms is not None else dense_ms / speedup
    flag = f"--latency {latency_ms:g}" if latency_ms is not None else f"--speedup {speedup:g}"
    if target >= dense_ms:
        raise UserError(f"{flag}: the dense model already takes {dense_ms:.2f} ms (predicted) "
                        "here; nothing to prune for")
    return target


def describe_allocation(latency: LatencyModel, architecture: Architecture,
                        importance: dict[str, list[float]],
                        *columns: tuple[str, dict[str, int]]) -> str:
    """A table of layers (conv1.., fc1, fc2, and the time outside them): for each column
    (a title and widths), each layer's width, the share of its `importance` the widths
    keep (its most important channels) and its predicted ms."""
    keys = list(widths_of(architecture))
    names = [layer["name"] for layer in layers_of(architecture, latency.key["image_size"])]
    header = f"{'layer':<8}" + "".join(f"{title:>26}" for title, _ in columns)
    lines = [header, f"{'':<8}" + f"{'width  kept      ms':>26}" * len(columns)]
    times = [latency.layer_ms(with_widths(architecture, widths)) for _, widths in columns]
    for label, key in zip(names, keys):
        scores = importance[key]
        cells = []
        for (_, widths), layer_times in zip(columns, times):
            kept = sum(scores[len(scores) - widths[key]:]) / max(sum(scores), 1e-30)
            cells.append(f"{widths[key]:>13}{kept:>6.0%}{layer_times[label]:>7.2f}")
        lines.append(f"{label:<8}" + "".join(cells))
    outside = [f"{'':>19}{layer_times['other']:>7.2f}" for layer_times in times]
    totals = [f"{'':>19}{sum(layer_times.values()):>7.2f}" for layer_times in times]
    lines.append(f"{'outside':<8}" + "".join(outside))
    lines.append(f"{'total':<8}" + "".join(totals))
    return "\n".join(lines)


class Allocation(typing.NamedTuple):
    """allocation_for()'s answer: the allocated widths and their predicted ms; the uniform
    sparsity of the same predicted latency, its widths and predicted ms; the table."""
    widths: dict[str, int]
    predicted: float
    sparsity: float
    uniform: dict[str, int]
    uniform_ms: float
    report: str


def allocation_for(latency: LatencyModel, architecture: Architecture,
                   target_ms: float) -> Allocation:
    """The widths allocated for `target_ms` (channel_values(), in the kernels' step
    `latency.step`) beside the uniform cut of the same predicted latency, and the table
    of the dense, allocated and uniform widths (describe_allocation())."""
    values = channel_values(architecture)
    widths, predicted = allocate(latency, architecture, values, target_ms, latency.step)
    sparsity, uniform, uniform_ms = uniform_for(latency, architecture, target_ms)
    report = describe_allocation(latency, architecture, values,
                                 ("dense", widths_of(architecture)), ("allocated", widths),
                                 (f"uniform {sparsity:.2f}", uniform))
    return Allocation(widths, predicted, sparsity, uniform, uniform_ms, report)
