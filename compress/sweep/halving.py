"""Successive halving: every setting distilled briefly, the promising ones for longer.

`sweep.py --kd-epochs 5 20`: stage 1 distils every setting for 5 epochs. Then each
student is compared with the dense model on the val pictures (a paired difference, in
PyTorch), and half of them (rounded up) continue for 20 epochs more, chosen among those
no other setting beats in both accuracy and cost (multiply-adds): first those whose
interval already reaches the --max-drop budget, the cheapest first (they save the most
time), then the most accurate. (On flowers, after 5 epochs every student was 8 to 20
points below the dense model: a rule that continued only those within reach of a 1-point
budget continued one; docs/photos.md.) The others stop where they are and stay
candidates. A continued stage
starts from the stage before's best student with the learning-rate schedule planned
again over its own epochs (its warm-up, then its cosine down to 0: each stage ends
annealed, so the decision after it compares settled students), and sees the pictures
of the epochs after those it has seen (Recipe.first_epoch): one store of the teacher's
answers serves every stage of every setting. docs/photos.md measures a continued run
against one planned at the full length from the start.

- `stage_recipe()`: the recipe of a stage.
- `standing()`: a student's paired difference on val from the dense model, and its cost.
- `halving_settings()`, `most_trials()`, `experiment_rows()`: the settings, the most
  trials, and sweep.json's rows of halving run as an NNI experiment (nni_halving.py).
(Which settings continue: rules.survivors(), which NNI's advisor, nni_halving.py,
applies too.)
- `copy_student()`: a student and its history copied.
- `continue_setting()`: one setting's next stage: its student so far kept as
  NAME.stageK.pth (and its history beside it), the next stage's written to NAME.pth.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence

import torch

from compress.checkpoints import load_checkpoint, model_from_checkpoint, output_path, write_json
from compress.measure.comparison import load_model, split_loader
from compress.measure.evaluation import count_flops, evaluate
from compress.measure.intervals import PairedDifference, paired_difference
from compress.sweep.candidates import SweepSetup, read_evaluation
from compress.sweep.decision import SELECTION_SPLIT
from compress.training.distillation import distil_checkpoint
from compress.training.loop import EpochRecord
from compress.training.recipe import Recipe


def stage_recipe(recipe: Recipe, stages: list[int], stage: int) -> Recipe:
    """The recipe of `stage` (from 0) of `stages` (epochs each): `recipe` for its epochs,
    its pictures those of the epochs after the stages before."""
    return dataclasses.replace(recipe, epochs=stages[stage], first_epoch=sum(stages[:stage]))


def dense_hits(setup: SweepSetup) -> list[int]:
    """Which val pictures the dense model gets right in PyTorch (kept in the sweep's folder
    beside the measurements, so a resumed sweep does not evaluate it again)."""
    teacher = setup.teacher
    path = setup.dense_evaluation(teacher.path, teacher.checkpoint, SELECTION_SPLIT)
    known = read_evaluation(path)
    if known:
        return known["hits"]
    model = model_from_checkpoint(teacher.checkpoint, teacher.path).to(setup.device).eval()
    metrics = val_metrics(setup, teacher.checkpoint, teacher.path, model)
    if path:
        write_json(metrics, path)
    return metrics["hits"]


def val_metrics(setup: SweepSetup, checkpoint: dict, path: str,
                model: torch.nn.Module) -> dict:
    """evaluate() of `model` (the checkpoint at `path`) on the val pictures, as the
    candidates are measured (compare.json keeps the same figures)."""
    loader = split_loader(setup.data, checkpoint, path, setup.device, setup.recipe.batch_size,
                          setup.recipe.workers, SELECTION_SPLIT)
    metrics = evaluate(model, loader, setup.device, len(checkpoint["class_names"]))
    return {key: metrics[key] for key in ("accuracy", "loss", "per_class_accuracy", "confusion",
                                          "count", "hits")}


def standing(setup: SweepSetup, student: str, reference: list[int]) -> dict:
    """The student at `student` after a stage: its val accuracy in PyTorch, its paired
    difference from the dense model's `reference` hits ("vs_dense"), and its multiply-adds
    per picture ("flops": what it costs to run)."""
    checkpoint, model = load_model(student, setup.device)
    metrics = val_metrics(setup, checkpoint, student, model)
    difference: PairedDifference = paired_difference(reference, metrics["hits"],
                                                     setup.timing.seed)
    return {"val_accuracy": metrics["accuracy"], "vs_dense": difference,
            "flops": count_flops(model.cpu(), checkpoint["image_size"], setup.verbose)[0]}


def most_trials(settings: int, stages: int) -> int:
    """The most trials halving `settings` over `stages` runs (half continue, rounded up)."""
    total, running = 0, settings
    for _ in range(stages):
        total += running
        running = math.ceil(running / 2)
    return total


def halving_settings(methods: Sequence[tuple[str, bool]],
                     sparsities: Sequence[float]) -> list[dict]:
    """The settings successive halving starts with: --methods x --sparsities as listed, as
    the advisor's parameters name them."""
    return [{"method": method + (":global" if global_ranking else ""), "sparsity": sparsity}
            for method, global_ranking in dict.fromkeys(methods)
            for sparsity in dict.fromkeys(sparsities)]


def experiment_rows(trials: Sequence, done: Sequence, training: dict,
                    stages: Sequence[int]) -> list[dict]:
    """sweep.json's rows of successive halving run as an NNI experiment (nni_halving.py):
    of its `trials` (nni_engine.Trial), those `done` (finished, checked), one row per
    setting, its student that of its last finished stage, its "stages" as the plain sweep
    records them (each one's epochs, trial, and the standing after it: val accuracy,
    paired difference from the dense model, multiply-adds, and before the last stage
    whether it continued: a later stage began, whether or not it finished)."""
    by_setting = {}
    for trial in sorted(done, key=lambda trial: trial.start or 0):
        by_setting.setdefault(trial.final["name"], {})[trial.final["stage"]] = trial
    began = {(trial.parameters["method"], trial.parameters["sparsity"],
              trial.parameters["stage"]) for trial in trials if trial.parameters}
    rows = []
    for name, runs in by_setting.items():
        runs = [runs[stage] for stage in sorted(runs)]
        last = runs[-1].final
        rows.append({"name": name, "engine": "nni", "trial": runs[-1].id,
                     "method": last["method"], "global": last["global"],
                     "sparsity": last["sparsity"], "path": last["path"],
                     "accuracy": last["accuracy"], "params": last["params"],
                     "training": training, "reported": last, "epochs": last["epochs"],
                     "stages": [{"epochs": stages[run.final["stage"]], "trial": run.id,
                                 **{key: run.final[key] for key in ("val_accuracy", "vs_dense",
                                                                    "flops")},
                                 **({"continued": (run.parameters["method"],
                                                   run.parameters["sparsity"],
                                                   run.final["stage"] + 1) in began}
                                    if run.final["stage"] < len(stages) - 1 else {})}
                                for run in runs],
                     "minutes": round(sum(run.end - run.start for run in runs) / 60000, 2)})
    return rows


def copy_student(student: str, copy: str) -> None:
    """The student at `student` copied to `copy`, its history beside it (each whole or not
    at all: a copy is renamed into place)."""
    for path, destination in ((output_path(student, "history.json"),
                               output_path(copy, "history.json")), (student, copy)):
        if os.path.isfile(path):
            shutil.copy2(path, destination + ".part")
            os.replace(destination + ".part", destination)


def continue_setting(setup: SweepSetup, student: str, stages: list[int], stage: int,
                     on_epoch: Callable[[EpochRecord], None] | None = None) -> None:
    """Distil the student at `student` (NAME.pth, after `stage` stages) for the epochs of
    stage `stage` (from 0): it is kept first as NAME.stageK.pth (K = `stage`, its history
    as NAME.stageK.history.json), the new stage's best student written to NAME.pth. A stage
    stopped by Ctrl-C continues from its state file. `on_epoch(record)` is told each
    epoch."""
    teacher = setup.teacher
    before = output_path(student, f"stage{stage}.pth")
    state = output_path(student, "state.pth")
    resume = state if os.path.isfile(state) else None
    if not os.path.isfile(before):  # (once: NAME.pth is then the new stage's)
        copy_student(student, before)
    checkpoint = load_checkpoint(before, kinds=("finetuned",))
    recipe = stage_recipe(setup.recipe, stages, stage)
    torch.manual_seed(recipe.seed)  # dropout's draws, as knowledge_distillation.py seeds them
    distil_checkpoint(teacher.checkpoint, teacher.path, checkpoint, before, data=setup.data,
                      output=student, recipe=recipe, distillation=setup.distillation,
                      device=setup.device, teacher_sha256=teacher.sha256, resume=resume,
                      teacher_cache=setup.teacher_cache(checkpoint["image_size"]),
                      tensorboard=setup.tensorboard, on_epoch=on_epoch)
