"""How fast a model is: timed runs after warm-up, and several models timed interleaved.

- `measure_latency()` / `median_seconds()`: the median of timed runs after warm-up.
- `interleaved_seconds()`: several models timed interleaved, each round in a new
  order, until every median is known well enough; a `Timing` per model, with its
  spread. `TimingPlan` holds how (test.py --compare and the sweep's flags).
- `synchronizer()`: what waits for the work queued on a device.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
import typing
from collections.abc import Callable, Sequence

import torch

from compress.cli import settings_from

# --compare and the sweep time until each model's median is known this well
PRECISION = 0.02


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    """How models are timed (`interleaved_seconds`): `warmup` untimed rounds, then at least
    `repeats` and at most `max_repeats` timed ones, until each median is known within
    `precision` of itself."""
    warmup: int = 3
    repeats: int = 10
    max_repeats: int = 60
    precision: float = PRECISION
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TimingPlan:
        """The plan of --warmup, --repeats, --max-repeats and --seed (cli.add_timing_args)."""
        return settings_from(cls, args)


def measure_latency(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device,
                    warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of one forward pass of `model` on `inputs`, after warm-up runs.

    The same inputs every run, under inference_mode, CUDA synchronised before
    each clock read so queued kernels are counted.
    """
    model.eval()
    inputs = inputs.to(device)
    with torch.inference_mode():
        return median_seconds(lambda: model(inputs), synchronizer(device), warmup, repeats)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the work queued on `device`: CUDA's synchronize, or nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_seconds(run: Callable[[], object], sync: Callable[[], None], warmup: int,
                   repeats: int) -> float:
    """Call `run` warmup + repeats times; the median wall time of the timed calls.

    `sync()` is called before starting and before stopping each clock, so work
    queued on an accelerator is finished inside the measured interval.
    """
    return interleaved_seconds([run], sync, warmup, repeats, repeats)[0].median


class Timing(typing.NamedTuple):
    """How long a model took: the median of its timed runs, their spread, how many."""
    median: float  # seconds
    iqr: float  # interquartile range of the timed runs, seconds
    runs: int

    @property
    def spread(self):
        """The interquartile range relative to the median."""
        return self.iqr / self.median

    @property
    def uncertainty(self):
        """How well the median is known, relative to it: about IQR / sqrt(runs) (the
        median's standard error is 0.93 IQR / sqrt(runs) for normal noise)."""
        return self.spread / math.sqrt(self.runs)


def timing_of(times: Sequence[float]) -> Timing:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times))


def interleaved_seconds(runs: Sequence[Callable[[], object]], sync: Callable[[], None],
                        warmup: int, repeats: int, max_repeats: int,
                        precision: float = PRECISION, seed: int = 0) -> list[Timing]:
    """Time each of `runs` (callables) interleaved: every round calls each once, in an
    order shuffled anew each round (seeded), so a slower stretch of the machine, or a
    run that leaves the caches cold for the next, falls on all of them alike. (A fixed
    or merely rotated order was measured to slow whichever run follows the largest
    model by 6-19%.)

    After `warmup` untimed rounds, at least `repeats` timed rounds, and more, up to
    `max_repeats`, until every run's median is known within `precision` of itself
    (Timing.uncertainty). Returns a Timing per run; `sync()` as for median_seconds().
    """
    times = [[] for _ in runs]
    order = list(range(len(runs)))
    shuffle = random.Random(seed).shuffle
    for round_index in range(warmup + max(repeats, max_repeats)):
        shuffle(order)
        for index in order:
            sync()
            started = time.perf_counter()
            runs[index]()
            sync()
            if round_index >= warmup:
                times[index].append(time.perf_counter() - started)
        timed = round_index + 1 - warmup
        if timed >= repeats and all(timing_of(t).uncertainty <= precision for t in times):
            break
    return [timing_of(t) for t in times]
