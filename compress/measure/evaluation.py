"""How good and how big a model is.

- `evaluate()`: accuracy, mean cross-entropy and the confusion matrix on a loader
  (all processes' shares added up under torchrun), and which pictures it got right
  (in a single process: what a paired comparison of two models needs).
- `count_flops()`: FLOPs and parameters of one image's forward pass (NNI's counter).
- `relative_difference()`: how far one model's outputs are from another's.
- `ModelRow`: one model's measured figures, as test.py --compare and the sweep report
  them (comparison.compare() makes them).

(How fast: timing.py; several models side by side: comparison.py.)
"""
from __future__ import annotations

import typing
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compress.cli import quiet_nni
from compress.machine.distributed import all_reduce_sum, distributed
from compress.measure.intervals import PairedDifference


class ModelRow(typing.TypedDict, total=False):
    """One model measured (comparison.model_row() and time_models()): a row of
    test.py --compare's table and of compare.json.

    Args:
        name, path, kind, arch: which model, from which file (checkpoint or .onnx).
        split: the split its accuracy is on (test, or val without one); val_images: how
            many pictures; accuracy, accuracy_low, accuracy_high: on them, and its 95%
            interval; by_split: each split's figures (and "hits": which were right);
            difference: against the first model of the comparison on the same pictures.
        per_class_accuracy, confusion, class_names, loss: the rest of the evaluation.
        params, flops, file_bytes: how big; zero_weights: the share of the weights that is
            zero, zipped_bytes: the file compressed (where that share is 10% or more).
        latency_ms, latency_iqr_ms, latency_runs, batch_ms, throughput_ips, ...: how fast,
            timed interleaved; timing_uncertainty: how well the medians are known.
        device, threads, cpu, cpu_class, runtime, precision, memory_format, image_size:
            where and how it ran.
    """
    name: str
    path: str
    kind: str
    arch: str
    split: str
    val_images: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    by_split: dict[str, dict]
    difference: PairedDifference | None
    per_class_accuracy: list[float]
    confusion: list[list[int]]
    class_names: list[str]
    loss: float
    params: int
    flops: int
    file_bytes: int
    zero_weights: float
    zipped_bytes: int | None
    latency_ms: float
    latency_iqr_ms: float
    throughput_ips: float
    timing_uncertainty: float
    device: str
    threads: int
    cpu: str
    cpu_class: str
    runtime: str
    precision: str
    memory_format: str | None
    image_size: int


def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, num_classes: int,
             progress: str | None = None) -> dict:
    """Accuracy, mean cross-entropy and the confusion matrix (rows: true, cols: predicted);
    "hits": 1 for each picture it got right, in the loader's order (None under torchrun,
    where each process sees a share)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, count, hits = 0.0, 0, []
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=progress, leave=False,
                                   disable=True if progress is None else None):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(images).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            predictions = logits.argmax(1)
            hits += (predictions == labels).int().tolist()
            confusion += torch.bincount(labels.cpu() * num_classes + predictions.cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    # under torchrun each process saw its share of the images: add them up
    *flat, total_loss, count = all_reduce_sum(confusion.flatten().tolist() + [total_loss, count],
                                              device)
    confusion = torch.tensor(flat).round().long().view(num_classes, num_classes)
    return dict(confusion_metrics(confusion, total_loss, int(count)),
                hits=hits if distributed()[1] == 1 else None)


def confusion_metrics(confusion: torch.Tensor, total_loss: float, count: int) -> dict:
    """evaluate()'s figures from the confusion matrix and the summed loss."""
    per_class_total = confusion.sum(1).clamp(min=1)
    return {"accuracy": confusion.diag().sum().item() / max(count, 1),
            "loss": total_loss / max(count, 1),
            "per_class_accuracy": (confusion.diag() / per_class_total).tolist(),
            "confusion": confusion.tolist(), "count": count}


def relative_difference(outputs: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference between two outputs, relative to the expected
    outputs' scale (NaN if either holds one)."""
    return ((outputs - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def count_flops(model: torch.nn.Module, image_size: int, verbose: bool = False) -> tuple[int, int]:
    """FLOPs and parameters of one image's forward pass, by NNI's counter (on the CPU)."""
    with quiet_nni(verbose):
        from nni.compression.utils.counter import count_flops_params
        flops, params, _ = count_flops_params(model, torch.zeros(1, 3, image_size, image_size),
                                              verbose=False)
    return int(flops), int(params)


