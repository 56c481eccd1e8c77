"""A sweep's candidates: what they share, and how they are measured as they ship.

- `Teacher`: the dense checkpoint and its file's SHA-256, read once per run, refused
  now for what a stage would refuse later.
- `SweepSetup`: what every setting shares (the teacher, the data, the distillation
  recipe, the device, the timing, the target runtime).
- `measure_candidates()`: the students and the dense model measured together in the target
  runtime (targets.TARGETS: their int8 ONNX files by default), as test.py --compare
  measures, and in PyTorch beside it; the Pareto fronts marked.
  (The decision on them: decision.py.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence

import torch

from compress.checkpoints import (Checkpoint, check_made_for, file_sha256, load_checkpoint,
                                  model_from_checkpoint, write_json)
from compress.cli import UserError, resolve_device, settings_from
from compress.data.images import ImageFolder, report_split
from compress.measure.comparison import compare, load_model
from compress.measure.intervals import PairedDifference, paired_difference
from compress.measure.reporting import save_comparison
from compress.measure.timing import TimingPlan
from compress.pruning.channels import check_rankable
from compress.pruning.latency import RUNTIMES as LATENCY_RUNTIMES
from compress.pruning.latency import LatencyModel, cached, load_or_build
from compress.sweep.decision import SELECTION_SPLIT, mark_pareto
from compress.sweep.report import SweepRow, in_pytorch
from compress.sweep.targets import TARGETS, ship, target_file
from compress.training.distillation import DISTILLATION_DEFAULTS, Distillation
from compress.training.recipe import RECIPE_DEFAULTS, Recipe
from compress.training.teacher_store import key_name, pictures_fingerprint, store_key
from compress.training.tensorboard_log import log_settings
from model import MOBILENET_V2

# what evaluate() gives that a dense_evaluation() file keeps
EVALUATED = ("accuracy", "loss", "per_class_accuracy", "confusion", "count", "hits")
# the pytorch figures each row keeps beside the target's (sweep.json's "pytorch")
PYTORCH_FIGURES = ("accuracy", "accuracy_low", "accuracy_high", "latency_ms", "latency_iqr_ms",
                   "throughput_ips", "file_bytes", "path", "split", "by_split")


@dataclasses.dataclass
class Teacher:
    """The dense model every student of a sweep is pruned from and distilled by: its
    checkpoint and its file's SHA-256, read once per run."""
    path: str
    checkpoint: Checkpoint
    sha256: str

    @classmethod
    def load(cls, path: str, image_size: int | None = None,
             methods: Sequence[str] = ()) -> Teacher:
        """The dense checkpoint at `path`, refused now for what the stages would refuse
        later: another image size than `image_size`, a method (of --methods) that cannot
        rank its channels."""
        checkpoint = load_checkpoint(path, kinds=("dense",))
        check_made_for(checkpoint, path, "--image-size", image_size=image_size)
        for method in methods:
            check_rankable(checkpoint, path, method, "--methods")
        return cls(path, checkpoint, file_sha256(path))


@dataclasses.dataclass
class SweepSetup:
    """What every setting of a sweep shares: the teacher, the split in `data`, the
    distillation's `recipe` and loss (`distillation`), the device, how the models are
    timed, the image size asked for (None: the teacher's), whether NNI may talk, and the
    runtime that decides (`target`, a key of targets.TARGETS). sweep.py builds it from
    its flags (`from_args()`)."""
    teacher: Teacher
    data: str
    recipe: Recipe
    distillation: Distillation = Distillation()
    device: torch.device = torch.device("cpu")
    timing: TimingPlan = TimingPlan()
    image_size: int | None = None
    verbose: bool = False
    target: str = "int8"
    store_dir: str | None = None  # where the teacher's logits are kept (None: not kept)
    tensorboard: str | None = None  # --tensorboard DIR
    stages: tuple[int, ...] = ()  # --kd-epochs of each stage of successive halving (halving.py)

    def __post_init__(self):
        self.stages = tuple(self.stages) or (self.recipe.epochs,)
        if self.stages[0] != self.recipe.epochs:
            raise ValueError(f"the first stage's epochs {self.stages[0]} are not the recipe's "
                             f"{self.recipe.epochs}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, teacher: Teacher) -> SweepSetup:
        """The setup of sweep.py's flags, for `teacher` (read once by the caller)."""
        return settings_from(cls, args, teacher=teacher,
                             recipe=Recipe.from_args(args, epochs=args.kd_epochs[0]),
                             stages=tuple(args.kd_epochs),
                             distillation=Distillation.from_args(args),
                             device=resolve_device(args.device),
                             timing=TimingPlan.from_args(args), store_dir=args.output_dir)

    def training_settings(self) -> dict:
        """What makes two students comparable: the same teacher, data, recipe and loss (kept
        whole in each row of sweep.json, and compared whole: comparable_training())."""
        return {**self.recipe.settings(), **self.distillation.settings(),
                "data": os.path.abspath(self.data), "image_size": self.image_size,
                # (retrained in place, it is another teacher)
                "teacher_sha256": self.teacher.sha256}

    def teacher_cache(self, image_size: int) -> str | None:
        """The file of the teacher's logits for this sweep's distillations of students of
        `image_size` px (teacher_store.py), in `store_dir`, named by its key: every such
        student of the sweep shares it."""
        if self.store_dir is None:
            return None
        teacher = self.teacher
        pictures = ImageFolder(os.path.join(self.data, "train"), None,
                               teacher.checkpoint["class_names"])
        key = store_key(teacher.sha256, pictures, self.recipe, image_size=image_size,
                        normalization=teacher.checkpoint["normalization"], device=self.device)
        return os.path.join(self.store_dir, f"teacher_logits.{key_name(key)}.pt")

    def latency_model(self) -> LatencyModel:
        """The teacher's latency model on this CPU in the target runtime, batch 1 (cached:
        pruning.latency.load_or_build()); refused for --target onnx, which it does not
        model."""
        if self.target not in LATENCY_RUNTIMES:
            raise UserError(f"--target {self.target}: latency targets are modelled for "
                            f"{' and '.join(LATENCY_RUNTIMES)} only")
        teacher = self.teacher
        return load_or_build(teacher.checkpoint["architecture"],
                             self.image_size or teacher.checkpoint["image_size"], self.target, 1)

    def splits(self) -> list[str]:
        """The splits the candidates are measured on: the report split, then val (decided
        on), once each."""
        return list(dict.fromkeys([report_split(self.data), SELECTION_SPLIT]))

    def dense_evaluation(self, path: str, description: dict, split: str) -> str | None:
        """The file (in `store_dir`) of the dense model's evaluation on DATA/`split` as the
        file `path` (its checkpoint, or an .onnx file of it) gave it: named by what decides
        it, so that a sweep or a trial measuring the same file again need not evaluate it."""
        if self.store_dir is None:
            return None
        status = os.stat(path)
        pictures = ImageFolder(os.path.join(self.data, split), None,
                               self.teacher.checkpoint["class_names"])
        key = {"teacher_sha256": self.teacher.sha256, "file": os.path.basename(path),
               "bytes": status.st_size, "mtime_ns": status.st_mtime_ns,
               "precision": description.get("precision", "fp32"),
               "quantization": description.get("quantization"),
               "pictures": pictures_fingerprint(pictures.samples),
               **({} if split == "val" else {"split": split})}
        return os.path.join(self.store_dir, f"dense_evaluation.{key_name(key)}.json")

    def ship_student(self, path: str, **known) -> dict | None:
        """targets.ship() of the candidate at `path` with this sweep's data and loader
        settings (`known`: its checkpoint, SHA-256, fp32 path, as ship() takes them)."""
        return ship(path, data=self.data, batch_size=self.recipe.batch_size,
                    workers=self.recipe.workers, seed=self.recipe.seed, **known)

    def ship_dense(self, output_dir: str) -> str | None:
        """The dense model's .onnx files in `output_dir` (dense.onnx, dense.int8.onnx), made
        unless current: what the candidates are timed against. None for the pytorch target."""
        if self.target == "pytorch":
            return None
        fp32_path = os.path.join(output_dir, "dense.onnx")
        teacher = self.teacher
        self.ship_student(teacher.path, checkpoint=teacher.checkpoint, sha256=teacher.sha256,
                  fp32_path=fp32_path)
        return fp32_path


def comparable_training(training: dict) -> dict:
    """A row's training settings as this version records them: what an older sweep.json
    recorded under another name (kd_epochs), or not at all (the settings that were not
    flags yet), at what it was then."""
    upgraded = {**{key: value for key, value in RECIPE_DEFAULTS.items() if key != "workers"},
                **DISTILLATION_DEFAULTS, **training}
    if "kd_epochs" in upgraded:
        upgraded["epochs"] = upgraded.pop("kd_epochs")
    return upgraded


def measure_candidates(setup: SweepSetup, done: Sequence[SweepRow], report: str,
            output_dir: str) -> tuple[list[SweepRow], SweepRow]:
    """(rows, dense row): the students of `done` (rows with the "path" of their checkpoint,
    shipped if the target is not PyTorch) and the dense model (shipped into `output_dir`
    here), measured together in `setup.target`'s runtime as test.py --compare measures
    (its report, compare.json/.png, and a confusion matrix beside each file: `report`),
    then the same again in PyTorch, kept in each row's "pytorch" (compare.pytorch.json).
    The Pareto fronts marked; with --tensorboard, each setting and its figures written for
    TensorBoard's HParams tab."""
    target = setup.target
    dense_onnx = setup.ship_dense(output_dir)
    rows, dense = measure_in(setup, done, report, target, dense_onnx)
    if target != "pytorch":
        pytorch_rows, pytorch_dense = measure_in(
            setup, done, os.path.splitext(report)[0] + ".pytorch.json", "pytorch", None)
        for row, figures in zip([dense, *rows], [pytorch_dense, *pytorch_rows]):
            row["pytorch"] = {key: figures[key] for key in PYTORCH_FIGURES}
    reference = in_pytorch(dense)["by_split"]
    for row in [dense, *rows]:  # against the dense model as the user has it: in PyTorch
        row["difference"] = paired(reference, row, row["split"], setup.timing.seed)
        row["budget"] = paired(reference, row, SELECTION_SPLIT, setup.timing.seed)
    for row in [dense, *rows]:
        if "pytorch" in row:
            row.setdefault("accuracy_by_runtime", {})["pytorch"] = row["pytorch"]["accuracy"]
        row.setdefault("accuracy_by_runtime", {})[target] = row["accuracy"]
    add_predictions(setup, [dense, *rows])
    mark_pareto(rows)
    if setup.tensorboard:
        log_settings(setup.tensorboard, [dense, *rows])
    return rows, dense


def add_predictions(setup: SweepSetup, rows: Sequence[SweepRow]) -> None:
    """Each VGG row's batch-1 latency as this CPU's latency model predicts it
    ("predicted_ms"), where the cache holds one for the target runtime (a sweep with
    latency targets built it): how far the model is from what was measured."""
    teacher = setup.teacher
    if setup.target not in LATENCY_RUNTIMES:
        return
    model = cached(teacher.checkpoint["architecture"],
                   setup.image_size or teacher.checkpoint["image_size"], setup.target, 1)
    if model is None:
        return
    for row in rows:
        architecture = load_checkpoint(row["path"])["architecture"]
        if architecture["arch"] != MOBILENET_V2:
            row["predicted_ms"] = model.predict(architecture)


def paired(reference: dict, row: SweepRow, split: str, seed: int) -> PairedDifference:
    """The row's accuracy minus the reference's (by_split figures) on `split`, paired."""
    return paired_difference(reference[split]["hits"], row["by_split"][split]["hits"], seed)


def measure_in(setup: SweepSetup, done: Sequence[SweepRow], report: str, target: str,
               dense_onnx: str | None) -> tuple[list[SweepRow], SweepRow]:
    """measure_candidates() in one runtime: (rows, dense row), each row the setting as it was made
    with the numbers as measured now; "path" stays its checkpoint, "file" is what ran."""
    students = f"{len(done)} student" + ("s" if len(done) != 1 else "")
    print(f"\nMeasuring the dense model and {students} as test.py --compare, "
          f"{TARGETS[target].name} ...", flush=True)
    teacher, device = setup.teacher, setup.device
    files = [(teacher.path, target_file(teacher.path, target, dense_onnx))]
    files += [(row["path"], target_file(row["path"], target)) for row in done]
    models = []
    for (_, path), name in zip(files, ["dense", *(row["name"] for row in done)]):
        if path == teacher.path:  # (read once: built from the checkpoint in memory)
            checkpoint = teacher.checkpoint
            model = model_from_checkpoint(checkpoint, path).to(device).eval()
        else:
            checkpoint, model = load_model(path, device)
        models.append((name, path, checkpoint, model))
    # the dense model's evaluation, known from an earlier measurement of the same file
    splits = setup.splits()
    evaluations = {split: setup.dense_evaluation(files[0][1], models[0][2], split)
                   for split in splits}
    known = {split: read_evaluation(path) for split, path in evaluations.items()}
    measured = compare(models, data=setup.data, device=device, timing=setup.timing,
                       batch_size=setup.recipe.batch_size, workers=setup.recipe.workers,
                       verbose=setup.verbose, splits=splits,
                       known={files[0][1]: {s: m for s, m in known.items() if m}})
    for split, path in evaluations.items():
        if path and not known[split]:
            write_json({key: measured[0]["by_split"][split][key] for key in EVALUATED}, path)
    save_comparison(measured, report)
    rows = [{**row, **numbers, "name": row["name"], "path": row["path"], "file": file,
             "target": target} for row, numbers, (_, file) in zip(done, measured[1:], files[1:])]
    dense = dict(measured[0], path=teacher.path, file=files[0][1], target=target)
    return rows, dense


def read_evaluation(path: str | None) -> dict | None:
    """The metrics a dense_evaluation() file holds, or None (none yet, or unreadable)."""
    try:
        with open(path) as file:
            metrics = json.load(file)
        return metrics if set(metrics) == set(EVALUATED) and metrics["hits"] else None
    except (OSError, TypeError, ValueError):
        return None


def save_rows(rows: Sequence[SweepRow], dense: SweepRow, path: str) -> None:
    """sweep.json: the dense row, then each setting's."""
    write_json([dense, *rows], path)
