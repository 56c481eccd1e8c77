"""Iterative pruning: a sparsity reached in N prune-then-distil steps, not in one cut.

One-shot pruning removes (say) 70% of every layer's channels at once, and distillation
must then win back what the cut lost. Iteratively, each step removes a share, the
student is distilled from the dense teacher for its share of the epochs, and the next
step prunes *that* student, ranking its channels afresh. The final widths are exactly
the one-shot setting's (pruning.channels.uniform_widths), and the epochs add up to the
same --kd-epochs, so the two compare at equal size and equal cost.

- `step_widths()`: each step's widths, shrinking geometrically to the final ones.
- `step_epochs()`: --kd-epochs shared out between the steps.
- `prune_in_steps()`: the steps, each one's student kept (NAME.stepK.pth) so a sweep
  stopped in the middle continues from the last finished step.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import torch

from compress.checkpoints import load_checkpoint, model_from_checkpoint, output_path
from compress.cli import UserError
from compress.pruning.channels import prunable_layers, uniform_widths
from compress.sweep.candidates import SweepSetup
from compress.sweep.setting import Setting, check_outputs, prune_setting
from compress.training.distillation import distil_checkpoint
from compress.training.loop import EpochRecord


def step_widths(dense: dict[str, int], final: dict[str, int], steps: int) -> list[dict[str, int]]:
    """The widths after each of `steps` steps from `dense` to `final` (layer: channels):
    each step keeps the same share of what the one before kept; the last is `final`."""
    plan = []
    for step in range(1, steps + 1):
        plan.append({name: final[name] if step == steps else
                     max(final[name], round(width * (final[name] / width) ** (step / steps)))
                     for name, width in dense.items()})
    return plan


def step_epochs(epochs: int, steps: int) -> list[int]:
    """`epochs` shared out between `steps` steps, the later ones taking any remainder."""
    if epochs < steps:
        raise UserError(f"--prune-steps {steps}: needs at least as many --kd-epochs "
                        f"(got {epochs}): each step distils for one epoch or more")
    base, extra = divmod(epochs, steps)
    return [base + (1 if step >= steps - extra else 0) for step in range(steps)]


def finished(student: str, epochs: int) -> bool:
    """Whether a step's student ran all its `epochs` (its history says so) and is on disk."""
    try:
        with open(output_path(student, "history.json")) as file:
            return os.path.isfile(student) and len(json.load(file)) >= epochs and \
                not os.path.exists(output_path(student, "state.pth"))
    except (OSError, ValueError):
        return False


def prune_in_steps(setup: SweepSetup, student: str, setting: Setting,
                   on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """`setting` (its steps > 1) pruned and distilled step by step into `student`; the
    steps before the last write NAME.stepK.pth (and .pruned.pth). Returns the histories of
    every step, one after another (the epochs numbered through)."""
    if setting.global_ranking:
        raise UserError(f"{setting.name}: --prune-steps needs per-layer widths, which a "
                        "global ranking sets only as it ranks; drop :global")
    teacher, recipe = setup.teacher, setup.recipe
    dense = prunable_layers(model_from_checkpoint(teacher.checkpoint, teacher.path))
    plan = step_widths(dense, uniform_widths(dense, setting.sparsity), setting.steps)
    epochs = step_epochs(recipe.epochs, setting.steps)
    start, history = (teacher.checkpoint, teacher.path), []
    for step, (widths, step_epochs_) in enumerate(zip(plan, epochs), 1):
        output = student if step == setting.steps else output_path(student, f"step{step}.pth")
        state = output_path(output, "state.pth")
        resume = state if os.path.isfile(state) else None
        pruned = output_path(output, "pruned.pth")
        if not finished(output, step_epochs_):
            check_outputs(output, setting, resume)
            print(f"  step {step} of {setting.steps}: to {sum(widths.values()):,} channels, "
                  f"{step_epochs_} distillation epochs", flush=True)
            checkpoint = (load_checkpoint(pruned, kinds=("pruned", "finetuned")) if resume
                          else prune_setting(setup, pruned, setting, start, widths))
            torch.manual_seed(recipe.seed)  # dropout's draws, as knowledge_distillation.py
            distil_checkpoint(teacher.checkpoint, teacher.path, checkpoint, pruned,
                              data=setup.data, output=output,
                              recipe=dataclasses.replace(recipe, epochs=step_epochs_),
                              distillation=setup.distillation, device=setup.device,
                              teacher_sha256=teacher.sha256, resume=resume, on_epoch=on_epoch,
                              teacher_cache=setup.teacher_cache(checkpoint["image_size"]),
                              tensorboard=setup.tensorboard)
        with open(output_path(output, "history.json")) as file:
            history += [dict(record, epoch=len(history) + index + 1, step=step)
                        for index, record in enumerate(json.load(file))]
        start = (load_checkpoint(output, kinds=("finetuned",)), output)
    return history

