"""How a model is trained: the settings train.py, knowledge_distillation.py and sweep.py share.

- `Recipe`: epochs, the optimizer, its learning rate, schedule and weight decay,
  label smoothing, batch size, seed, crops, --cache, --amp, workers; built from the
  parsed flags by `Recipe.from_args()` (the one place a flag becomes a setting),
  saved whole with what it made (`Recipe.settings()`: the checkpoint's metrics, the
  Ctrl-C state, sweep.json), and making the run's loaders, optimizer and schedule.
- `rate_factor()`: the learning rate of a step, as a share of the peak.

    recipe = Recipe(epochs=20, lr=1e-3, optimizer="adamw", schedule="cosine",
                    warmup_epochs=1, weight_decay=0.05)
    optimizer = recipe.make_optimizer(model)
    scheduler = recipe.make_scheduler(optimizer, steps_per_epoch=len(train_loader))
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import torch

from compress.cli import MIXES, OPTIMIZERS, SCHEDULES, settings_from
from compress.data.images import ORIGINAL_NORMALIZATION, training_loaders

SGD_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is trained: what the training flags of train.py,
    knowledge_distillation.py and sweep.py say, each field named as its flag
    (`from_args()`; sweep.py's --kd-epochs is `epochs`). The defaults are the original
    demo's: Adam at a constant rate, no weight decay, no label smoothing.

    Args:
        epochs: passes over the training set.
        lr: the learning rate (the peak one, with a schedule).
        batch_size, seed, crop_scale, cache, amp: as the flags of the same names.
        workers: data-loading processes; None: the loaders' default (data.default_workers).
        optimizer: one of cli.OPTIMIZERS (sgd: momentum 0.9, Nesterov).
        weight_decay: on the weights of convolutions and linear layers, not on biases
            or batch-norm parameters (Adam: L2 in the gradient; AdamW: decoupled).
        schedule: one of cli.SCHEDULES: constant, or cosine (down to 0 at the last step).
        warmup_epochs: the rate rises linearly from near 0 over these epochs first.
        label_smoothing: of the cross-entropy on the labels.
        mix: none, or mixup or cutmix of pairs of training pictures (data.Mixed; a
            distillation's flag: the teacher answers the mixed picture the student sees).
        first_epoch: the epochs of the pictures are counted from here: a run that
            continues another for more epochs (a sweep's next stage) sees the pictures
            that run would have seen next, and the teacher's store answers them by key.
    """
    epochs: int
    lr: float
    batch_size: int = 32
    seed: int = 0
    crop_scale: float = 0.08
    cache: bool = False
    amp: bool = False
    workers: int | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mix: str = "none"
    first_epoch: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES \
                or self.mix not in MIXES:
            raise ValueError(f"optimizer {self.optimizer!r} (one of {OPTIMIZERS}), schedule "
                             f"{self.schedule!r} (one of {SCHEDULES}), mix {self.mix!r} (one of "
                             f"{MIXES})")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: object) -> Recipe:
        """The recipe of parsed arguments: each field from the flag of its name, those
        `given` instead (sweep.py: epochs=args.kd_epochs)."""
        return settings_from(cls, args, **given)

    def settings(self) -> dict:
        """What a model trained with this recipe depends on (not `workers`: the pictures
        of each batch do not depend on them), saved with what it made and compared whole."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key != "workers"}

    def loaders(self, data: str, image_size: int, device: torch.device,
                normalization: dict = ORIGINAL_NORMALIZATION, keyed: bool = False):
        """(train loader, val loader) of the split in `data` (data.training_loaders)."""
        return training_loaders(data, image_size, device, batch_size=self.batch_size,
                                workers=self.workers, seed=self.seed,
                                crop_scale=self.crop_scale, cache=self.cache,
                                normalization=normalization, keyed=keyed, mix=self.mix,
                                first_epoch=self.first_epoch)

    def resume_settings(self, image_size: int) -> dict:
        """What a resumed run must keep of this recipe, or it would not continue exactly
        (--epochs may change, unless a schedule depends on it)."""
        settings = dict(self.settings(), image_size=image_size)
        if self.schedule == "constant":
            del settings["epochs"]
        return settings

    def make_optimizer(self, model: torch.nn.Module,
                       rates: dict[int, float] | None = None) -> torch.optim.Optimizer:
        """The recipe's optimizer over `model`'s trainable parameters; `rates` gives some
        of them (by id()) a learning rate of their own."""
        rates = rates or {}
        groups = {}
        for parameter in model.parameters():
            if parameter.requires_grad:
                # (timm's habit: no decay on biases and normalisation parameters)
                decay = self.weight_decay if parameter.ndim > 1 else 0.0
                groups.setdefault((decay, rates.get(id(parameter), self.lr)), []).append(parameter)
        groups = [{"params": params, "weight_decay": decay, "lr": lr}
                  for (decay, lr), params in groups.items()]
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=SGD_MOMENTUM, nesterov=True)
        # fused: one kernel updates all parameters; the step is ~3x faster on CPU
        kind = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return kind(groups, lr=self.lr, fused=True)

    def make_scheduler(self, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR | None:
        """The learning rate by step (None for a constant one without warm-up)."""
        if self.schedule == "constant" and not self.warmup_epochs:
            return None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            rate_factor, warmup=round(self.warmup_epochs * steps_per_epoch),
            total=self.epochs * steps_per_epoch, cosine=self.schedule == "cosine"))


RECIPE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Recipe)
                   if field.default is not dataclasses.MISSING}


def rate_factor(step: int, *, warmup: int, total: int, cosine: bool) -> float:
    """The learning rate of `step` (from 0) of `total`, as a share of the peak: a linear
    warm-up over the first `warmup` steps, then constant or a cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
