"""Several models side by side: how good, how big and how fast each is, measured together.

- `load_model()`: any model file of this pipeline -- a checkpoint (.pth), a bare VGG
  state dict, or an .onnx file from export.py (run in onnxruntime) -- ready to run.
- `compare()`: each model's accuracy on DATA/test (DATA/val where there is no test
  split) with its 95% interval, and against the first model as a paired difference on
  the same pictures (intervals.py); parameters, FLOPs and file size; then all of them
  timed interleaved (batch-1 latency, batch-32 throughput) on the same inputs: one row
  (a dict) per model, as test.py --compare reports them.

    from compress.measure.comparison import compare, load_model
    models = [(name, path, *load_model(path, device)) for name, path in ...]
    rows = compare(models, data="dataset", device=device)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

import model as vgg
from compress.checkpoints import Checkpoint, check_made_for, load_checkpoint, model_from_checkpoint
from compress.data.images import make_loader, report_split, val_set
from compress.data.pictures import find_classes
from compress.export.onnx_files import load_onnx, zero_weight_share
from compress.machine.cpu import cpu_class, describe_cpu
from compress.measure.evaluation import ModelRow, count_flops, evaluate
from compress.measure.intervals import accuracy_interval, paired_difference
from compress.measure.timing import TimingPlan, interleaved_seconds, synchronizer
from compress.pruning.weights import ZEROS_WORTH_ZIPPING, compressed_bytes, zero_shares

CPU = torch.device("cpu")
THROUGHPUT_BATCH = 32


def load_model(path: str, device: torch.device, image_size: int | None = None,
               onnx_device: torch.device = CPU) -> tuple[dict, torch.nn.Module]:
    """(checkpoint, or an .onnx file's description; the model, in eval mode on `device`).

    .onnx files run in onnxruntime on `onnx_device` (the CPU unless CUDA is asked for
    by name: requirements.txt installs onnxruntime's CPU build). A bare state dict is
    read for `image_size` px; a file made for another size than `image_size` is refused.
    """
    if path.endswith(".onnx"):
        checkpoint, model = load_onnx(path, onnx_device)
    else:
        checkpoint = load_checkpoint(path, image_size=image_size)
        model = model_from_checkpoint(checkpoint, path).to(device).eval()
    check_made_for(checkpoint, path, "--image-size", image_size=image_size)
    return checkpoint, model


def split_loader(data: str, checkpoint: Checkpoint, path: str, device: torch.device,
                 batch_size: int, workers: int | None, split: str = "val"):
    """DATA/`split` as the checkpoint sees it, refused if its classes are not the
    checkpoint's."""
    folder = os.path.join(data, split)
    check_made_for(checkpoint, path, folder, class_names=find_classes(folder))
    dataset = val_set(data, checkpoint["image_size"], checkpoint["class_names"],
                      normalization=checkpoint["normalization"], split=split)
    return make_loader(dataset, batch_size, workers, device, sampler=None)


def split_figures(metrics: dict) -> dict:
    """What a row keeps of one split's evaluate(): all of it, and the accuracy's interval."""
    correct = sum(metrics["hits"]) if metrics.get("hits") is not None else \
        round(metrics["accuracy"] * metrics["count"])
    low, high = accuracy_interval(correct, metrics["count"])
    return dict(metrics, hits=metrics.get("hits"), accuracy_low=low, accuracy_high=high)


def model_row(name: str, path: str, checkpoint: Checkpoint, model: torch.nn.Module, *, data: str,
              device: torch.device, batch_size: int = 32, workers: int | None = None,
              verbose: bool = False, metrics: dict | None = None,
              splits: Sequence[str] = ("val",)) -> ModelRow:
    """One model's row before timing: accuracy (and the confusion matrix) on the first of
    `splits`, each split's figures in "by_split", size, FLOPs. `metrics`: its evaluate()
    of some splits, by split, if known already (those not evaluated again)."""
    image_size = checkpoint["image_size"]
    known = metrics or {}
    evaluated = {split: known.get(split) or evaluate(
        model, split_loader(data, checkpoint, path, device, batch_size, workers, split),
        device, len(checkpoint["class_names"]), progress=f"evaluating {name} on {split}")
        for split in dict.fromkeys(splits)}
    metrics = evaluated[splits[0]]
    onnx = path.endswith(".onnx")
    zeros = zero_weight_share(path) if onnx else zero_shares(model)["all"]
    # an .onnx file's FLOPs and parameters are those of the widths it describes
    counted = vgg.from_architecture(checkpoint["architecture"]) if onnx else model.cpu()
    flops, params = count_flops(counted, image_size, verbose)
    if not onnx:  # channels-last: measured faster on CPU for dense and pruned VGG16 alike
        model.to(device, memory_format=torch.channels_last)  # (tools/benchmark.py times both)
    return {"name": name, "path": path, "kind": checkpoint["kind"],
            "arch": checkpoint["architecture"]["arch"],
            "accuracy": metrics["accuracy"], "per_class_accuracy": metrics["per_class_accuracy"],
            "confusion": metrics["confusion"], "class_names": checkpoint["class_names"],
            "loss": metrics["loss"],
            "params": params, "flops": flops, "file_bytes": os.path.getsize(path),
            "zero_weights": zeros,
            # (compressing a dense 528 MB file takes seconds, and buys about 7%: only where
            # single weights were pruned)
            "zipped_bytes": compressed_bytes(path) if zeros >= ZEROS_WORTH_ZIPPING else None,
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu": describe_cpu(), "cpu_class": cpu_class(),
            "runtime": "onnxruntime" if onnx else "torch",
            "precision": checkpoint.get("precision", "fp32"),
            "memory_format": None if onnx else "channels_last",
            "image_size": image_size, "val_images": metrics["count"], "split": splits[0],
            "accuracy_low": split_figures(metrics)["accuracy_low"],
            "accuracy_high": split_figures(metrics)["accuracy_high"],
            "by_split": {split: split_figures(figures) for split, figures in evaluated.items()}}


def against_first(rows: Sequence[ModelRow], seed: int = 0) -> None:
    """Each row after the first compared with it on the same pictures of each split (a
    paired difference, intervals.paired_difference: "vs_first" in its split's figures),
    the report split's also as the row's "difference" (None where the hits are unknown)."""
    first = rows[0]["by_split"]
    for row in rows[1:]:
        for split, figures in row["by_split"].items():
            reference = first.get(split, {}).get("hits")
            figures["vs_first"] = (paired_difference(reference, figures["hits"], seed)
                                   if reference is not None and figures["hits"] is not None
                                   and len(reference) == len(figures["hits"]) else None)
        row["difference"] = row["by_split"][row["split"]]["vs_first"]


def time_models(rows: Sequence[ModelRow], models: Sequence[torch.nn.Module], device: torch.device,
                timing: TimingPlan) -> None:
    """Add each model's batch-1 latency and batch-32 throughput to its row, all models
    timed interleaved on the same random inputs (one set per image size)."""
    generator = torch.Generator().manual_seed(timing.seed)
    inputs = {}
    for row in rows:
        size = row["image_size"]
        if size not in inputs:
            inputs[size] = (torch.randn(1, 3, size, size, generator=generator),
                            torch.randn(THROUGHPUT_BATCH, 3, size, size, generator=generator))
    sync = synchronizer(device)
    for batch_index, (field, spread_field) in enumerate([("latency_ms", "latency_iqr_ms"),
                                                          ("batch_ms", "batch_iqr_ms")]):
        runs = []
        for row, model in zip(rows, models):
            batch = inputs[row["image_size"]][batch_index].to(device)
            if row["runtime"] == "torch":
                batch = batch.to(memory_format=torch.channels_last)
            runs.append(lambda model=model, batch=batch: model(batch))
        with torch.inference_mode():
            timings = interleaved_seconds(runs, sync, timing.warmup, timing.repeats,
                                          timing.max_repeats, timing.precision, timing.seed)
        for row, measured in zip(rows, timings):
            row.update({field: measured.median * 1000, spread_field: measured.iqr * 1000,
                        field.replace("_ms", "_runs"): measured.runs,
                        field.replace("_ms", "_uncertainty"): measured.uncertainty})
    for row in rows:
        row.update(batch_size=THROUGHPUT_BATCH,
                   throughput_ips=THROUGHPUT_BATCH / row["batch_ms"] * 1000,
                   timing_uncertainty=max(row["latency_uncertainty"], row["batch_uncertainty"]))


def compare(models: Sequence[tuple[str, str, dict, torch.nn.Module]], *, data: str,
            device: torch.device, timing: TimingPlan = TimingPlan(), batch_size: int = 32,
            workers: int | None = None, verbose: bool = False,
            known: dict[str, dict] | None = None, splits: Sequence[str] | None = None,
            say: Callable = print) -> list[ModelRow]:
    """Measure `models` -- (name, path, checkpoint, model) each, as load_model() gives them --
    on each of `splits` of DATA (default: data.report_split(), test if there is one), each
    against the first model on the same pictures, then time them all interleaved; a row
    per model, in the order given. Accuracy and "split" are those of the first split.

    Every model stays in memory until all are timed (dense VGG16: 0.5 GB). `known`: the
    evaluate() metrics of some of the files, by path then split, known already (not
    evaluated again).
    """
    splits = splits or [report_split(data)]
    rows = []
    for name, path, checkpoint, model in models:
        rows.append(model_row(name, path, checkpoint, model, data=data, device=device,
                              batch_size=batch_size, workers=workers, verbose=verbose,
                              metrics=(known or {}).get(path), splits=splits))
        say(f"measured {path}", flush=True)
    against_first(rows, timing.seed)
    say(f"timing {len(models)} models interleaved ...", flush=True)
    time_models(rows, [model for *_, model in models], device, timing)
    return rows
