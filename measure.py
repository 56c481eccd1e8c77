"""How good, how big and how fast a model is.

- `evaluate()`: accuracy, mean cross-entropy and the confusion matrix on a loader
  (all processes' shares added up under torchrun).
- `count_flops()`: FLOPs and parameters of one image's forward pass (NNI's counter).
- `measure_latency()` / `median_seconds()`: the median of timed runs after warm-up.
- `interleaved_seconds()`: several models timed interleaved, with their spread, for
  comparing them.
- `relative_difference()`: how far one model's outputs are from another's.
"""
import math
import random
import statistics
import time
import typing

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import quiet_nni
from distributed import all_reduce_sum


def evaluate(model, loader, device, num_classes, progress=None):
    """Accuracy, mean cross-entropy and the confusion matrix (rows: true, cols: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, count = 0.0, 0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=progress, leave=False,
                                   disable=True if progress is None else None):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(images).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            predictions = logits.argmax(1)
            confusion += torch.bincount(labels.cpu() * num_classes + predictions.cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    # under torchrun each process saw its share of the images: add them up
    *flat, total_loss, count = all_reduce_sum(confusion.flatten().tolist() + [total_loss, count],
                                              device)
    confusion = torch.tensor(flat).round().long().view(num_classes, num_classes)
    return summarise(confusion, total_loss, int(count))


def summarise(confusion, total_loss, count):
    per_class_total = confusion.sum(1).clamp(min=1)
    return {"accuracy": confusion.diag().sum().item() / max(count, 1),
            "loss": total_loss / max(count, 1),
            "per_class_accuracy": (confusion.diag() / per_class_total).tolist(),
            "confusion": confusion.tolist(), "count": count}


def relative_difference(outputs, expected):
    """The largest absolute difference between two outputs, relative to the expected
    outputs' scale (NaN if either holds one)."""
    return ((outputs - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def count_flops(model, image_size, verbose=False):
    """FLOPs and parameters of one image's forward pass, by NNI's counter (on the CPU)."""
    with quiet_nni(verbose):
        from nni.compression.utils.counter import count_flops_params
        flops, params, _ = count_flops_params(model, torch.zeros(1, 3, image_size, image_size),
                                              verbose=False)
    return int(flops), int(params)


def measure_latency(model, inputs, device, warmup=3, repeats=10):
    """Median seconds of one forward pass of `model` on `inputs`, after warm-up runs.

    The same inputs every run, under inference_mode, CUDA synchronised before
    each clock read so queued kernels are counted.
    """
    model.eval()
    inputs = inputs.to(device)
    with torch.inference_mode():
        return median_seconds(lambda: model(inputs), synchronizer(device), warmup, repeats)


def synchronizer(device):
    """What waits for the work queued on `device`: CUDA's synchronize, or nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_seconds(run, sync, warmup, repeats):
    """Call `run` warmup + repeats times; the median wall time of the timed calls.

    `sync()` is called before starting and before stopping each clock, so work
    queued on an accelerator is finished inside the measured interval.
    """
    return interleaved_seconds([run], sync, warmup, repeats, repeats)[0].median


class Timing(typing.NamedTuple):
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


def timing_of(times):
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times))


def interleaved_seconds(runs, sync, warmup, repeats, max_repeats, precision=0.02, seed=0):
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
