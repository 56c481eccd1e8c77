"""One setting of a sweep: a pruning method and sparsity, pruned and distilled from the teacher.

- `Setting`: what it is (method, global ranking, sparsity, steps; or MobileNetV2) and its
  name (l1-0.7, slim-global-0.5, l1-0.7-3steps): its files are NAME.pth and beside it.
- `prune_and_distil()`: one setting -- pruning.channels.prune_checkpoint() (or a new
  MobileNetV2), then distillation.distil_checkpoint() from the teacher's checkpoint
  read once; a distillation stopped by Ctrl-C continues from its state file. (With
  steps > 1: stepwise.prune_in_steps().)
- `prune_setting()`: the pruning alone, saved as pruner.py saves it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from compress.checkpoints import check_replaceable, load_checkpoint, output_path
from compress.export.convert import check_onnx_replaceable
from compress.pruning.allocation import allocation_for
from compress.pruning.channels import (METHODS, Pruning, prune_checkpoint, save_pruned,
                                       taylor_batches)
from compress.sweep.candidates import SweepSetup
from compress.sweep.targets import onnx_paths
from compress.training.distillation import distil_checkpoint, mobilenet_student
from compress.training.loop import EpochRecord
from model import MOBILENET_V2


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep: a pruning method and sparsity, reached in `steps` prune-then-
    distil steps (stepwise.py); or a method and a latency in ms (`latency_ms`: the widths
    allocated per layer for that predicted time, pruning.allocation); or (method None)
    MobileNetV2."""
    method: str | None
    global_ranking: bool = False
    sparsity: float | None = None
    steps: int = 1
    latency_ms: float | None = None

    def pruning(self, setup: SweepSetup) -> Pruning:
        """How this setting prunes, with the sweep's image size, seed and verbosity."""
        return Pruning(self.method, self.sparsity, self.global_ranking, setup.image_size,
                       setup.recipe.seed, setup.verbose)

    @property
    def name(self) -> str:
        """The setting's name (setting_name(); l1-2.5ms for a latency; mobilenet_v2)."""
        if self.method is None:
            return MOBILENET_V2
        if self.latency_ms is not None:
            return f"{self.method}-{self.latency_ms:.3g}ms"
        return setting_name(self.method, self.global_ranking, self.sparsity, self.steps)


def method_setting(text: str) -> tuple[str, bool]:
    """(method, global ranking) of METHOD or METHOD:global, as --methods and --search take
    them; ValueError otherwise (argparse names the flag, and this function's __name__)."""
    method, _, scope = text.partition(":")
    if method not in METHODS or scope not in ("", "global"):
        raise ValueError(text)
    return method, scope == "global"


method_setting.__name__ = "method (one of " + ", ".join(METHODS) + ", optionally :global)"


def setting_name(method: str, global_ranking: bool, sparsity: float, steps: int = 1) -> str:
    """l1-0.5, slim-global-0.7, l1-0.7-3steps, ...: a setting's name, and its files'
    (NAME.pth)."""
    return (f"{method}{'-global' if global_ranking else ''}-{sparsity:g}"
            + (f"-{steps}steps" if steps > 1 else ""))


def prune_and_distil(setup: SweepSetup, student: str, setting: Setting,
                     on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """One setting: the student is written to `student` (NAME.pth; the pruned model beside
    it as NAME.pruned.pth, its widths as NAME.pruned.channels.png). A distillation stopped
    by Ctrl-C or killed continues from its state file. `on_epoch(record)` is told each
    distillation epoch. Returns the distillation's history (every epoch, those before a
    resume too)."""
    teacher, recipe = setup.teacher, setup.recipe
    state = output_path(student, "state.pth")
    resume = state if os.path.isfile(state) else None
    pruned = output_path(student, "pruned.pth")
    check_outputs(student, setting, resume)
    if setting.method is None:
        torch.manual_seed(recipe.seed)  # the new MobileNetV2's weights, then dropout, draw on it
        checkpoint, student_path = mobilenet_student(teacher.checkpoint), f"a new {MOBILENET_V2}"
    else:
        student_path = pruned
        checkpoint = (load_checkpoint(pruned, kinds=("pruned", "finetuned")) if resume  # (kept)
                      else prune_setting(setup, pruned, setting))
        torch.manual_seed(recipe.seed)  # dropout's draws, as knowledge_distillation.py seeds them
    return distil_checkpoint(teacher.checkpoint, teacher.path, checkpoint, student_path,
                             data=setup.data, output=student, recipe=recipe,
                             distillation=setup.distillation,
                             device=setup.device, teacher_sha256=teacher.sha256,
                             resume=resume, on_epoch=on_epoch,
                             teacher_cache=setup.teacher_cache(checkpoint["image_size"]),
                             tensorboard=setup.tensorboard)


def check_outputs(student: str, setting: Setting, resume: str | None = None) -> None:
    """Refuse a file of someone else's where a setting's student (or pruned model, or the
    .onnx files it ships as) goes."""
    pruned = output_path(student, "pruned.pth")
    for path in ([student] if resume or setting.method is None else [student, pruned]):
        check_replaceable(path, "--output-dir")
    for path in onnx_paths(student).values():
        check_onnx_replaceable(path, "--output-dir")


def prune_setting(setup: SweepSetup, path: str, setting: Setting,
                  start: tuple[dict, str] | None = None,
                  widths: dict[str, int] | None = None) -> dict:
    """The teacher (or the checkpoint `start`, (checkpoint, its path)) pruned as `setting`
    says (to `widths`, if given), saved to `path` (as pruner.py saves it)."""
    teacher, recipe = setup.teacher, setup.recipe
    checkpoint, source = start or (teacher.checkpoint, teacher.path)
    if setting.latency_ms is not None:
        widths = allocated(setup, setting)
    batches = (taylor_batches(checkpoint, source, setup.data,
                              batch_size=recipe.batch_size, seed=recipe.seed)
               if setting.method == "taylor" else [])
    pruning = setting.pruning(setup)
    pruned, report = prune_checkpoint(checkpoint, source, pruning, batches=batches,
                                      widths=widths)
    print(f"  params {report['params_before']:,} -> {report['params_after']:,}, FLOPs "
          f"{report['flops_before'] / report['flops_after']:.2f}x fewer; the sped-up model "
          f"matches the masked one ({report['difference']:.1e})", flush=True)
    save_pruned(pruned, report, path, pruning)
    return pruned


def allocated(setup: SweepSetup, setting: Setting) -> dict[str, int]:
    """The widths of the teacher allocated for `setting.latency_ms` on this CPU, in the
    sweep's target runtime at batch 1 (pruning.allocation), printed layer by layer
    beside the uniform cut of the same predicted latency."""
    latency = setup.latency_model()
    chosen = allocation_for(latency, setup.teacher.checkpoint["architecture"],
                            setting.latency_ms)
    print(f"  widths allocated for {setting.latency_ms:.3g} ms ({latency.key['runtime']}, "
          f"batch 1): {chosen.predicted:.2f} ms predicted", flush=True)
    print(chosen.report, flush=True)
    return chosen.widths
