"""Widths chosen for a latency: the channels that matter most per millisecond they cost.

HALP's idea (Shen et al., NeurIPS 2022) with a greedy in place of its knapsack: start
from the dense widths and, while the latency model (latency.py) predicts more than the
target, take away the group of `step` channels whose importance is least per
millisecond its removal saves, anywhere in the network. A layer whose channels cost
time and matter little thins fast; one that costs little keeps its channels. Widths
stay multiples of the step the kernels favour (latency.favoured_step()), and no layer
keeps fewer than FLOOR of its channels.

- `channel_importance()`: each prunable layer's channels by importance, comparable
  across layers (the method's score divided by its layer's mean: a weight norm grows
  with the layer's inputs; slim's batch-norm scales compare as they are).
- `allocate()`: the widths for a target, and the predicted latency they reach.
- `uniform_for()`: the uniform sparsity whose widths the model predicts at a target
  (what the allocation is held against).
"""
from __future__ import annotations

from torch import nn

from compress.cli import UserError
from compress.pruning.channels import HIDDEN_LINEAR, prunable_layers, uniform_widths
from compress.pruning.latency import LatencyModel, widths_of, with_widths
from model import Architecture

FLOOR = 0.05  # a layer keeps at least this share of its channels (and one step)


def channel_importance(model: nn.Module, method: str = "l1") -> dict[str, list[float]]:
    """{layer: its channels' importances, least first}, for prunable_layers(). l2: the L2
    norm of each output channel's weights, slim: the batch-norm scale |gamma| (as it is),
    l1 and the others: the L1 norm; norms divided by their layer's mean."""
    scores = {}
    for name in prunable_layers(model):
        module = model.get_submodule(name)
        weights = module.weight.detach().flatten(1)
        if method == "slim" and not name.startswith(tuple(HIDDEN_LINEAR)):
            parent, index = name.rsplit(".", 1)
            norm = model.get_submodule(f"{parent}.{int(index) + 1}").weight.detach().abs()
        else:
            norm = weights.norm(p=2 if method == "l2" else 1, dim=1)
            norm = norm / norm.mean().clamp(min=1e-12)
        scores[name] = sorted(norm.tolist())
    return scores


def allocate(latency: LatencyModel, architecture: Architecture, importance: dict[str, list[float]],
             target_ms: float, step: int = 1) -> tuple[dict[str, int], float]:
    """(widths, predicted ms): the dense `architecture` thinned by groups of `step`
    channels, least important per millisecond saved first, until `latency` predicts at
    most `target_ms`. UserError if even the narrowest widths allowed stay above it."""
    dense = widths_of(architecture)
    widths = {name: width - width % step if width > step else width
              for name, width in dense.items()}
    least = narrowest(architecture, step)
    predicted = latency.predict(with_widths(architecture, widths))
    while predicted > target_ms:
        best, best_ratio, best_time = None, None, None
        for name, width in widths.items():
            if width - step < least[name]:
                continue
            trial = dict(widths, **{name: width - step})
            time = latency.predict(with_widths(architecture, trial))
            saved = predicted - time
            # the group of `step` least important channels still kept in this layer
            kept = importance[name][len(importance[name]) - width:]
            cost = sum(kept[:step])
            ratio = cost / saved if saved > 0 else float("inf")
            if best_ratio is None or ratio < best_ratio:
                best, best_ratio, best_time = name, ratio, time
        if best is None or best_time >= predicted:
            raise UserError(f"--latency {target_ms:g} ms: below what any allowed widths reach "
                            f"here (at least {reachable_ms(latency, architecture, step):.2f} "
                            f"ms predicted, every layer at {FLOOR:.0%} of its channels)")
        widths[best] -= step
        predicted = best_time
    return widths, predicted


def narrowest(architecture: Architecture, step: int = 1) -> dict[str, int]:
    """The narrowest widths an allocation in steps of `step` may leave: FLOOR of each
    layer's channels, and at least one step (or the layer whole, if narrower)."""
    return {name: min(width, max(step, round(FLOOR * width)))
            for name, width in widths_of(architecture).items()}


def reachable_ms(latency: LatencyModel, architecture: Architecture, step: int = 1) -> float:
    """The least latency `latency` predicts for an allocation in steps of `step`."""
    return latency.predict(with_widths(architecture, narrowest(architecture, step)))


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


def describe_widths(architecture: Architecture, *columns: tuple[str, dict[str, int]]) -> str:
    """A table of layer widths (conv1.., fc1, fc2), a column each."""
    names = [f"conv{i + 1}" for i in range(sum(w != "M" for w in architecture["features"]))]
    names += ["fc1", "fc2"]
    keys = list(widths_of(architecture))
    lines = [f"{'layer':<8}" + "".join(f"{title:>12}" for title, _ in columns)]
    for label, key in zip(names, keys):
        lines.append(f"{label:<8}" + "".join(f"{widths[key]:>12}" for _, widths in columns))
    return "\n".join(lines)

