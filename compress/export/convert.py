"""Shipping a checkpoint: fp32 ONNX, int8 ONNX for a CPU class, each checked before it is saved.

- `export_checkpoint()`: what export.py does -- both files from a checkpoint, the
  fp32 one checked against PyTorch, the int8 one measured against it on DATA/val
  and saved only within a budget of accuracy points; written atomically. How: an
  `ExportPlan` (export.py's flags, `ExportPlan.from_args()`).
- `export_onnx()`: an fp32 ONNX file (torch.onnx's dynamo exporter) that takes any
  batch size, with its description (onnx_files.describe()) in its metadata.
- `quantize_int8()`: static post-training int8 (QDQ: uint8 activations, int8
  weights) of such a file, calibrated on real pictures, for a CPU class (cpu.py):
  7-bit weights where u8 x s8 products can saturate (`int8_settings()`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable

import torch

from compress.checkpoints import (Checkpoint, check_made_for, check_replaceable, file_sha256,
                                  model_from_checkpoint, saved_bytes)
from compress.cli import CheckFailed, settings_from
from compress.data.images import ImageFolder, eval_transform, make_loader, report_split, val_set
from compress.data.pictures import find_classes
from compress.export.onnx_files import (INPUT, OUTPUT, describe, load_onnx, parse_description,
                                        set_metadata, written_by_export)
from compress.machine.cpu import cpu_class, describe_cpu, saturates
from compress.machine.resources import check_room, disk_full, free_bytes
from compress.measure.evaluation import relative_difference

# The fp32 file must compute what PyTorch does, up to this relative difference.
TOLERANCE = 1e-4
# The int8 file may lose at most this many accuracy points against the fp32 one.
INT8_MAX_DROP = 1.0
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """How a checkpoint is shipped: export.py's flags, each field named as its flag.

    Args:
        calibration: training pictures whose activations set int8's value ranges.
        batch_size, workers: pictures per batch and loader processes, calibrating and
            measuring.
        seed: of the calibration sample.
        int8_for: the CPU class (cpu.CPU_CLASSES) the int8 file is for; None: this one's.
        int8_max_drop: the int8 file is saved only if it lost at most this many accuracy
            points against the fp32 file ...
        force_int8: ... or anyway.
        verbose: show the exporter's and the quantiser's messages.
        split: the split of DATA the int8 check decides on: val, the split that chooses
            (the sweep's too); where DATA holds a test split, the files' accuracy there is
            reported beside it, and decides nothing.
    """
    calibration: int = 128
    batch_size: int = 32
    workers: int | None = 0
    seed: int = 0
    int8_for: str | None = None
    int8_max_drop: float = INT8_MAX_DROP
    force_int8: bool = False
    verbose: bool = False
    split: str = "val"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportPlan:
        """The plan of export.py's flags."""
        return settings_from(cls, args)


@contextlib.contextmanager
def quiet(verbose: bool):
    """The exporter and the quantiser print progress, warnings and log lines (the quantiser's
    advice to pre-process: measured on the demo's model, it changed neither accuracy nor
    speed); hide them unless asked."""
    if verbose:
        yield
        return
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def export_onnx(model: torch.nn.Module, path: str, description: dict,
                verbose: bool = False) -> None:
    """Write `model` (on the CPU) as fp32 ONNX to `path`, with `description` in its metadata.

    The batch dimension is declared dynamic: torch.export otherwise fixes every
    dimension to the example's (a batch of one gave a file that takes only one).
    (The caller makes the write atomic: export_checkpoint() writes into a folder of its
    own.)
    """
    size = description["image_size"]
    example = torch.zeros(1, 3, size, size)
    with quiet(verbose):
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    set_metadata(proto, description)
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())


class Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of image tensors."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch.contiguous().numpy()}


def int8_settings(cpu: str) -> dict:
    """How an int8 file for CPU class `cpu` is quantised.

    `reduce_range` (7-bit weights) where u8 x s8 products can saturate (cpu.py), else
    8-bit. Weights per output channel: measured on the demo's distilled model (fp32
    95.4%, 240 pictures), per channel / per tensor gave 96.7% / 95.8% with 8-bit
    weights on an AMX CPU, and 96.25% / 94.6% with 7-bit ones on AVX2 (where 8-bit
    per channel gave 88.75%); docs/shipping.md has the whole table.
    """
    return {"cpu": cpu, "reduce_range": saturates(cpu), "per_channel": True}


def quantize_int8(fp32_path: str, path: str, calibration: Iterable[torch.Tensor], cpu: str,
                  verbose: bool = False) -> dict:
    """Static int8 of the fp32 ONNX file at `fp32_path` for CPU class `cpu`, written to
    `path`; returns its settings (`int8_settings`), also recorded in its metadata.

    `calibration` yields batches of pictures as the model sees them (normalised);
    activation ranges are set from them. QDQ format, uint8 activations and int8
    weights, as onnxruntime recommends for x86 CPUs.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    settings = int8_settings(cpu)
    with quiet(verbose):
        quantize_static(fp32_path, path, Batches(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=settings["per_channel"],
                        reduce_range=settings["reduce_range"])
    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    set_metadata(proto, dict(parse_description(props, path), precision="int8",
                             quantization=settings))
    onnx.save(proto, path)
    return settings


def int8_path_of(fp32_path: str) -> str:
    """Where the int8 file of an fp32 one goes: model.onnx -> model.int8.onnx."""
    return fp32_path[:-len(".onnx")] + ".int8.onnx"


def check_onnx_replaceable(path: str, flag: str = "--output") -> None:
    """Refuse, before any work, to overwrite an .onnx file that export.py did not write."""
    check_replaceable(path, flag, ours=written_by_export, what="was not written by export.py")


def calibration_batches(pictures: ImageFolder, count: int, batch_size: int, seed: int,
                        workers: int = 0) -> Iterable[torch.Tensor]:
    """`count` of `pictures`, a seeded sample, in batches of images."""
    order = torch.randperm(len(pictures), generator=torch.Generator().manual_seed(seed))
    sample = torch.utils.data.Subset(pictures, order[:count].tolist())
    for images, _ in make_loader(sample, batch_size, workers, CPU, sampler=None):
        yield images


def predictions(models: dict, loader: Iterable) -> tuple[dict, torch.Tensor]:
    """Every model's top-1 class for each picture of `loader`, and the true classes."""
    outputs, labels = {name: [] for name in models}, []
    with torch.inference_mode():
        for images, batch_labels in loader:
            labels.append(batch_labels)
            for name, model in models.items():
                outputs[name].append(model(images).argmax(1))
    return {name: torch.cat(tops) for name, tops in outputs.items()}, torch.cat(labels)


def export_checkpoint(checkpoint: Checkpoint, weights: str, fp32_path: str, *, data: str,
                      plan: ExportPlan = ExportPlan(), source_sha256: str | None = None,
                      say: Callable = print) -> dict:
    """Export the model of `checkpoint` (read from the file `weights`) to `fp32_path` and its
    int8 file beside it (int8_path_of), for the CPU class `plan.int8_for`.

    Refused before any work (UserError): an .onnx file there that export.py did not write,
    DATA/train or DATA/val of other classes. The fp32 file must compute what PyTorch
    computes (else CheckFailed, nothing saved); the int8 file is calibrated on
    `plan.calibration` pictures of DATA/train and measured on DATA/val (`plan.split`) on
    this CPU (and reported on DATA/test, where there is one), and
    saved only if it lost at most `plan.int8_max_drop` points against the fp32 file (or
    `plan.force_int8`).
    Both are built in a folder beside them and renamed into place. Returns the report:
    paths, accuracies, agreement, points lost, the int8 settings, whether it was saved.
    `source_sha256`: the SHA-256 of `weights`, if the caller has it (else read).
    """
    int8_path = int8_path_of(fp32_path)
    for path in (fp32_path, int8_path):
        check_onnx_replaceable(path)
    split = plan.split
    reported = report_split(data)
    folders = {"measured": os.path.join(data, split), "train": os.path.join(data, "train")}
    for folder in folders.values():
        check_made_for(checkpoint, weights, folder, class_names=find_classes(folder))
    transform = eval_transform(checkpoint["image_size"], checkpoint["normalization"])
    pictures = ImageFolder(folders["train"], transform, checkpoint["class_names"])
    val_loader = make_loader(val_set(data, checkpoint["image_size"], checkpoint["class_names"],
                                     normalization=checkpoint["normalization"], split=split),
                             plan.batch_size, plan.workers, CPU, sampler=None)
    description = describe(checkpoint, weights, source_sha256 or file_sha256(weights))
    model = model_from_checkpoint(checkpoint, weights).eval()
    here = cpu_class()
    target = plan.int8_for or here

    # written beside the outputs, then renamed into place: nothing half-written is left
    folder = os.path.dirname(os.path.abspath(fp32_path))
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    # the fp32 file holds the weights as they are, the int8 one a quarter of them
    needed = 1.25 * saved_bytes(checkpoint["state_dict"])
    check_room(fp32_path, needed, "the fp32 and int8 ONNX files")
    free = free_bytes(folder)

    def full_disk():  # the writes below: a full disk said as one, naming the fp32 file
        return disk_full(fp32_path, needed, free=free,
                         kept="nothing was saved (files there before are as they were)")
    scratch = tempfile.mkdtemp(dir=folder, prefix=".export-")
    saved = False
    try:
        started = time.perf_counter()
        say(f"Exporting {weights} ({checkpoint['kind']}, {checkpoint['image_size']} px) "
            "to ONNX ...", flush=True)
        fp32_scratch = os.path.join(scratch, "fp32.onnx")
        with full_disk():
            export_onnx(model, fp32_scratch, description, plan.verbose)
        fp32 = load_onnx(fp32_scratch)[1]
        images = next(iter(val_loader))[0]
        with torch.inference_mode():
            difference = relative_difference(fp32(images), model(images))
        if not difference <= TOLERANCE:  # NaN too
            raise CheckFailed(f"the ONNX model differs from {weights} by {difference:.1e} "
                              f"(relative, more than {TOLERANCE:g}) on {len(images)} pictures; "
                              "nothing was saved")
        say(f"  fp32 ONNX computes what PyTorch computes: max relative difference "
            f"{difference:.1e} on {len(images)} pictures ({time.perf_counter() - started:.0f}s)")

        started = time.perf_counter()
        say(f"Quantizing to int8 for {target} CPUs"
            + ("" if target == here else f" (this one: {describe_cpu()})")
            + f", calibrated on {min(plan.calibration, len(pictures))} pictures of "
            f"{folders['train']} ...", flush=True)
        int8_scratch = os.path.join(scratch, "int8.onnx")
        with full_disk():
            settings = quantize_int8(fp32_scratch, int8_scratch,
                                     calibration_batches(pictures, plan.calibration,
                                                         plan.batch_size, plan.seed,
                                                         plan.workers), target, plan.verbose)
        int8 = load_onnx(int8_scratch)[1]
        tops, labels = predictions({"torch": model, "fp32": fp32, "int8": int8}, val_loader)
        accuracy = {name: (top == labels).float().mean().item() for name, top in tops.items()}
        agreement = (tops["int8"] == tops["fp32"]).float().mean().item()
        say(f"  {'7-bit' if settings['reduce_range'] else '8-bit'} weights per "
            f"{'channel' if settings['per_channel'] else 'tensor'}"
            + (" (reduce_range: u8 x s8 products saturate int16 there)"
               if settings["reduce_range"] else ""))
        say(f"  on {len(labels)} pictures of {folders['measured']}, on this CPU ({here}): accuracy "
            f"PyTorch {accuracy['torch']:.1%}, ONNX fp32 {accuracy['fp32']:.1%}, int8 "
            f"{accuracy['int8']:.1%}; int8 agrees with fp32 on {agreement:.1%} "
            f"({time.perf_counter() - started:.0f}s)")
        lost = round(100 * (accuracy["fp32"] - accuracy["int8"]), 9)
        int8_saved = lost <= plan.int8_max_drop or plan.force_int8
        if reported != split:  # (reported, never decided on)
            test_loader = make_loader(val_set(data, checkpoint["image_size"],
                                              checkpoint["class_names"],
                                              normalization=checkpoint["normalization"],
                                              split=reported),
                                      plan.batch_size, plan.workers, CPU, sampler=None)
            tops, labels = predictions({"fp32": fp32, "int8": int8}, test_loader)
            reported_accuracy = {name: (top == labels).float().mean().item()
                                 for name, top in tops.items()}
            say(f"  on {len(labels)} pictures of {os.path.join(data, reported)} (reported, not "
                f"decided on): ONNX fp32 {reported_accuracy['fp32']:.1%}, int8 "
                f"{reported_accuracy['int8']:.1%}")
        if int8_saved:
            os.replace(int8_scratch, int8_path)
        os.replace(fp32_scratch, fp32_path)
        saved = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made_folder and not saved:
            shutil.rmtree(folder, ignore_errors=True)
    return {"fp32_path": fp32_path, "int8_path": int8_path, "int8_saved": int8_saved,
            "cpu": here, "int8_for": target, "settings": settings, "accuracy": accuracy,
            "agreement": agreement, "int8_lost_points": lost, "val_images": len(labels),
            "split": split,
            "difference": difference}
