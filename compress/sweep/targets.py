"""What the sweep decides by: each candidate as the file that would ship, in its runtime.

- `TARGETS`: the runtimes a sweep can decide by (sweep.py --target): int8 ONNX in
  onnxruntime (what export.py ships), fp32 ONNX in onnxruntime, the checkpoint in
  PyTorch.
- `ship()`: a checkpoint exported and calibrated as export.py does (fp32 and int8 ONNX
  beside it), unless it was exported before from the same checkpoint for this CPU; the
  int8 file is kept even if it lost accuracy (the sweep counts it by what it measures).
- `target_file()`: the file of a checkpoint that a target measures;
  `target_accuracy()`: its accuracy on DATA/val in that runtime.
"""
from __future__ import annotations

import typing
from collections.abc import Callable

import torch

from compress.checkpoints import Checkpoint, file_sha256, load_checkpoint, output_path
from compress.export.convert import ExportPlan, export_checkpoint, int8_path_of, int8_settings
from compress.export.onnx_files import read_description
from compress.machine.cpu import cpu_class
from compress.measure.comparison import load_model, split_loader
from compress.measure.evaluation import evaluate


class Target(typing.NamedTuple):
    """A runtime a sweep can decide by: its name in tables, and what it measures."""
    name: str
    measures: str


TARGETS = {"int8": Target("int8 ONNX in onnxruntime",
                          "the int8 ONNX file in onnxruntime (what export.py ships)"),
           "onnx": Target("fp32 ONNX in onnxruntime", "the fp32 ONNX file in onnxruntime"),
           "pytorch": Target("PyTorch", "the checkpoint in PyTorch")}
CPU = torch.device("cpu")


def onnx_paths(checkpoint_path: str, fp32_path: str | None = None) -> dict[str, str]:
    """{"onnx": the fp32 file, "int8": the int8 file} of a checkpoint: beside it, with
    .onnx and .int8.onnx (or at `fp32_path` and beside that)."""
    fp32 = fp32_path or output_path(checkpoint_path, "onnx")
    return {"onnx": fp32, "int8": int8_path_of(fp32)}


def target_file(checkpoint_path: str, target: str, fp32_path: str | None = None) -> str:
    """The file of a checkpoint that `target` measures: the checkpoint, or an .onnx file."""
    return checkpoint_path if target == "pytorch" else \
        onnx_paths(checkpoint_path, fp32_path)[target]


def is_current(checkpoint_path: str, sha256: str, fp32_path: str | None = None) -> bool:
    """Whether both .onnx files of a checkpoint were exported from it (its `sha256`), the
    int8 one for this CPU's class with today's settings."""
    paths = onnx_paths(checkpoint_path, fp32_path)
    try:
        descriptions = [read_description(path) for path in paths.values()]
    except Exception:  # missing, foreign, damaged: exported again (or refused) by ship()
        return False
    return (all(d["source_sha256"] == sha256 for d in descriptions)
            and descriptions[1].get("quantization") == int8_settings(cpu_class()))


def ship(checkpoint_path: str, *, data: str, checkpoint: Checkpoint | None = None,
         batch_size: int = 32, workers: int | None = 0, seed: int = 0,
         sha256: str | None = None, fp32_path: str | None = None,
         say: Callable = print) -> dict | None:
    """Export the checkpoint at `checkpoint_path` (`checkpoint` if the caller holds it
    already, else read only if needed; its SHA-256 `sha256` if known) as export.py does,
    to its .onnx files (onnx_paths()), unless they are current; returns {"pytorch",
    "onnx", "int8"} accuracies on DATA/val as the export measured them, or None if nothing
    was exported."""
    sha256 = sha256 or file_sha256(checkpoint_path)
    if is_current(checkpoint_path, sha256, fp32_path):
        return None
    checkpoint = checkpoint or load_checkpoint(checkpoint_path)
    paths = onnx_paths(checkpoint_path, fp32_path)
    # (measured on val, as the sweep decides: the test split is for the final report)
    plan = ExportPlan(batch_size=batch_size, workers=workers or 0, seed=seed, force_int8=True,
                      split="val")
    report = export_checkpoint(checkpoint, checkpoint_path, paths["onnx"], data=data, plan=plan,
                               source_sha256=sha256, say=say)
    if not report["int8_lost_points"] <= 1:
        say(f"  (the int8 file lost {report['int8_lost_points']:.2f} points: the sweep counts "
            "it by its int8 accuracy)")
    accuracy = report["accuracy"]
    return {"pytorch": accuracy["torch"], "onnx": accuracy["fp32"], "int8": accuracy["int8"]}


def target_accuracy(checkpoint_path: str, target: str, *, data: str, batch_size: int = 32,
                    workers: int | None = 0) -> float:
    """The accuracy on DATA/val of `target`'s file of a checkpoint, in its runtime."""
    path = target_file(checkpoint_path, target)
    checkpoint, model = load_model(path, CPU)
    loader = split_loader(data, checkpoint, path, CPU, batch_size, workers)
    return evaluate(model, loader, CPU, len(checkpoint["class_names"]))["accuracy"]
