"""What Ctrl-C saves and --resume restores: a run continued exactly where it stopped.

- `Totals`: the sums of the epoch in progress; `Progress`: where a run stands.
- `save_training_state()` / `load_training_state()`: the model, optimizer, schedule, RNG
  and where in the epoch; a state that would not continue exactly (other settings,
  processes or model) is refused in one line.
- `refuse_pending_state()`: a fresh run never overwrites what an interrupted one left.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from compress.checkpoints import atomic_save, safe_load
from compress.cli import UserError
from compress.machine.distributed import all_reduce_sum, distributed
from compress.training.recipe import RECIPE_DEFAULTS

# /2: the model and Adam's moments in the channels-last layout
TRAINING_STATE_FORMAT = "vgg-prune-distill-state/2"


@dataclasses.dataclass
class Totals:
    """Sums over the images trained so far in an epoch."""
    loss: float = 0.0  # of each image's loss
    correct: int = 0
    images: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch: its mean loss, its top-1 hits, its images."""
        self.loss += loss.item() * labels.numel()
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.images += labels.numel()

    def all_reduced(self, device: torch.device) -> Totals:
        """The totals of all processes together (these, in a single process)."""
        loss, correct, images = all_reduce_sum([self.loss, self.correct, self.images], device)
        return Totals(loss, round(correct), round(images))  # counts stay integers


@dataclasses.dataclass
class Progress:
    """Where a run stands: what Ctrl-C saves and --resume restores."""
    epoch: int = 0  # the epoch in progress, from 0
    samples_done: int = 0  # images of it this process has trained
    history: list = dataclasses.field(default_factory=list)  # a record per finished epoch
    best: float = -1.0  # the best validation accuracy so far
    totals: Totals = dataclasses.field(default_factory=Totals)  # of the epoch in progress


def save_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None, device: torch.device,
                        progress: Progress, settings: dict,
                        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Everything --resume needs to continue exactly where the run stopped.

    `progress.totals` must already hold all processes' sums (`Totals.all_reduced`).
    """
    atomic_save({"format": TRAINING_STATE_FORMAT, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "scaler": scaler.state_dict() if scaler else None,
                 "scheduler": scheduler.state_dict() if scheduler else None,
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "world": distributed()[1], "settings": settings,
                 "epoch": progress.epoch, "samples_done": progress.samples_done,
                 "history": progress.history, "best": progress.best,
                 "sums": [progress.totals.loss, progress.totals.correct, progress.totals.images]},
                path)


def load_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None, device: torch.device,
                        settings: dict, epochs: int,
                        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
                        ) -> Progress:
    """Restore a state saved by Ctrl-C into `model`, `optimizer`, `scheduler` and the RNG;
    returns its Progress. Refused (UserError) unless it continues this run exactly: same
    `settings` (declared by the caller: the flags and files a resumed run must keep; one
    an older state did not record counts as the Recipe's default), same number of
    processes, an epoch below `epochs`, the same model."""
    state = safe_load(path, "a training state saved by Ctrl-C")
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        older = isinstance(state, dict) and str(state.get("format")).startswith(
            TRAINING_STATE_FORMAT.split("/")[0])
        raise UserError(f"{path}: " + ("saved by an older version of this pipeline, which "
                                       "trained in another memory layout; start over"
                                       if older else "not a training state saved by this pipeline"))
    rank, world = distributed()
    if state["world"] != world:
        raise UserError(f"{path}: saved by {state['world']} process(es), resumed by {world}")
    saved = dict(state["settings"])
    for key, default in RECIPE_DEFAULTS.items():  # (not recorded before they were flags)
        if key in settings:
            saved.setdefault(key, default)
    unrecorded = [flag(k) for k in settings if k not in saved]
    if unrecorded:
        raise UserError(f"{path}: saved by an older version of this pipeline, which did not "
                        f"record {', '.join(unrecorded)}; start over")
    changed = [f"{flag(k)} {saved[k]} (now {settings[k]})" for k in settings
               if saved[k] != settings[k]]
    changed += [f"{flag(k)} {saved[k]} (now not given)" for k in saved if k not in settings]
    if changed:
        raise UserError(f"{path}: was saved with {', '.join(changed)}; resume with the same flags "
                        "and files")
    if state["epoch"] >= epochs:
        raise UserError(f"{path}: stopped in epoch {state['epoch'] + 1}, but --epochs is {epochs}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{path}: saved for a different model than the one given") from None
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if scheduler and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    # the saved sums are all processes' together: one process carries them on (older
    # states saved under torchrun hold the counts as floats)
    loss, correct, images = state["sums"]
    totals = Totals(loss, round(correct), round(images)) if rank == 0 else Totals()
    return Progress(state["epoch"], state["samples_done"], state["history"], state["best"], totals)


def flag(setting: str) -> str:
    """A setting's flag as the user types it: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


def refuse_pending_state(path: str, device: torch.device) -> None:
    """A fresh run must not overwrite the state an interrupted one left for --resume."""
    # rank 0 writes the state: every process must agree to refuse, or the others would hang
    if all_reduce_sum([float(distributed()[0] == 0 and os.path.exists(path))], device)[0]:
        raise UserError(f"{path}: an interrupted or killed run left this; add --resume {path} "
                        "to continue it, or delete it to start over")
