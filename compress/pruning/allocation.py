"""Widths chosen for a latency: the channels that matter most per millisecond they cost.

HALP's idea (Shen et al., NeurIPS 2022) with a greedy in place of its knapsack: start
from the dense widths and, while the latency model (latency.py) predicts more than the
target, take away the group of channels whose importance is least per millisecond its
removal saves, anywhere in the network. The time saved is the whole model's predicted
time before and after, so what a layer's width does to the next layer's time counts. A
layer whose channels cost time and matter little thins fast; one that costs little keeps
its channels.

Bounds: widths move in multiples of the step the kernels favour
(latency.favoured_step()) down to one step, then a channel at a time; no layer keeps
fewer than FLOOR of its channels; and no layer keeps less than 1/NEIGHBOUR_RATIO of the
share its neighbours keep. Without that last bound, on flowers, the greedy kept wide
layers fed by 16-channel ones (a layer fed by few channels costs little at any width)
and the student lost 3.5 points to the uniform cut of the same latency (docs/latency.md).

- `channel_importance()`: each prunable layer's channels by importance, comparable
  across layers: taylor, the first-order Taylor estimate of the loss change when a
  channel goes (HALP's, on the batch norm's scale and shift, or a Linear's row), summed
  over batches; the norms, divided by their layer's mean (a weight norm grows with the
  layer's inputs); slim's batch-norm scales as they are.
- `allocate()`: the widths for a target, and the predicted latency they reach.
- `uniform_for()`: the uniform sparsity whose widths the model predicts at a target
  (what the allocation is held against).
- `describe_allocation()`: each layer's width, the share of its importance kept and its
  predicted time, a column each for the allocated and the uniform widths.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.cli import UserError
from compress.pruning.channels import HIDDEN_LINEAR, prunable_layers, uniform_widths
from compress.pruning.latency import LatencyModel, layers_of, widths_of, with_widths
from model import Architecture

FLOOR = 0.05  # a layer keeps at least this share of its channels
NEIGHBOUR_RATIO = 2.0  # and at least 1 / this of the share each neighbour keeps


def channel_importance(model: nn.Module, method: str = "l1",
                       batches: list | None = None) -> dict[str, list[float]]:
    """{layer: its channels' importances, least first}, for prunable_layers(). taylor:
    taylor_importance() on `batches`; l2: the L2 norm of each output channel's weights,
    slim: the batch-norm scale |gamma| (as it is), l1 and the others: the L1 norm; norms
    divided by their layer's mean."""
    if method == "taylor":
        return taylor_importance(model, batches or [])
    scores = {}
    for name in prunable_layers(model):
        module = model.get_submodule(name)
        weights = module.weight.detach().flatten(1)
        if method == "slim" and not name.startswith(tuple(HIDDEN_LINEAR)):
            norm = following_norm(model, name).weight.detach().abs()
        else:
            norm = weights.norm(p=2 if method == "l2" else 1, dim=1)
            norm = norm / norm.mean().clamp(min=1e-12)
        scores[name] = sorted(norm.tolist())
    return scores


def following_norm(model: nn.Module, name: str) -> nn.Module | None:
    """The BatchNorm2d right after the convolution `name` (features.N), if there is one."""
    if name.startswith(tuple(HIDDEN_LINEAR)):
        return None
    parent, index = name.rsplit(".", 1)
    following = model.get_submodule(parent)[int(index) + 1]
    return following if isinstance(following, nn.BatchNorm2d) else None


def taylor_importance(model: nn.Module, batches: list) -> dict[str, list[float]]:
    """{layer: importances, least first}: for each output channel, (sum of parameter x
    gradient of the cross-entropy)^2 over its batch-norm scale and shift (or its own
    weights and bias where no batch norm follows), summed over `batches` of (images,
    labels): the first-order estimate of the loss change when the channel goes. One
    scale for every layer: the loss."""
    if not batches:
        raise ValueError("taylor importance needs batches of training pictures")
    model = model.eval()
    owners = {name: following_norm(model, name) or model.get_submodule(name)
              for name in prunable_layers(model)}
    totals = {name: torch.zeros(owner.weight.shape[0]) for name, owner in owners.items()}
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        for name, owner in owners.items():
            channels = len(totals[name])
            change = (owner.weight * owner.weight.grad).detach().reshape(channels, -1).sum(1)
            if owner.bias is not None:
                change = change + (owner.bias * owner.bias.grad).detach()
            totals[name] += change ** 2
    model.zero_grad(set_to_none=True)
    return {name: sorted(total.tolist()) for name, total in totals.items()}


def narrower(width: int, step: int, least: int) -> int | None:
    """The next width down from `width`: a step less while that leaves at least one step,
    then a channel less; None below `least`."""
    smaller = width - step if width - step >= step else width - 1
    return smaller if smaller >= max(least, 1) else None


def allocate(latency: LatencyModel, architecture: Architecture, importance: dict[str, list[float]],
             target_ms: float, step: int = 1) -> tuple[dict[str, int], float]:
    """(widths, predicted ms): the dense `architecture` thinned, least important channels
    per millisecond saved first (see the module: steps, FLOOR, NEIGHBOUR_RATIO), until
    `latency` predicts at most `target_ms`. UserError if even the narrowest widths
    allowed stay above it."""
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
    (a title and widths), each layer's width, the share of its importance the widths keep
    (its most important channels) and its predicted ms."""
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
