"""The training loop of train.py (labels) and knowledge_distillation.py (a teacher).

- `train_one_epoch()` runs the batches of one epoch and returns its `Totals`;
  it can be called alone, as in a notebook.
- `fit()` wires it to validation, the best checkpoint and the history
  (<output>.history.json and .png), with Ctrl-C and --resume (resume.py), AMP
  (`amp_context()`) and torchrun.

The caller builds the model, the optimizer, its schedule and the loaders (with a
recipe.Recipe), and chooses the memory format (`MEMORY_FORMAT` is the one both
stages use).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import typing
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from compress.checkpoints import output_path, write_json
from compress.cli import Interrupted, UserError, local_rank
from compress.machine.cpu import native_bf16, read_cpuinfo
from compress.machine.distributed import (all_reduce_sum, data_parallel, distributed,
                                          share_buffers_of_rank_0)
from compress.machine.resources import DiskFull
from compress.measure.evaluation import evaluate
from compress.measure.reporting import plot_history
from compress.training.resume import (Progress, Totals, load_training_state,
                                      refuse_pending_state, save_training_state)
from compress.training.tensorboard_log import EpochLog

# channels-last: training VGG16 on a 2-core CPU measured 1.3x faster at 224 px (batch
# 16) and no slower at 64 px; on CUDA it is the layout tensor cores want
MEMORY_FORMAT = torch.channels_last


class EpochRecord(typing.TypedDict, total=False):
    """One epoch of a run's history (<output>.history.json).

    Args:
        epoch: from 1; train_loss, train_accuracy: over the epoch's training pictures;
        val_loss, val_accuracy: after it, on DATA/val; images_per_second: training only
        (None after a resume that left the epoch nothing to train); seconds: the epoch
        with its validation; lr: the learning rate it ended at (with a schedule);
        bn_penalty, bn_scales_near_zero: train.py --bn-sparsity's figures; step: the
        step of an iterative pruning it belongs to.
    """
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    images_per_second: float | None
    seconds: float
    lr: float
    bn_penalty: float
    bn_scales_near_zero: int
    step: int


class StopRequest:
    """First Ctrl-C asks the loop to stop after the current batch; a second one aborts.

    (Under torchrun the launcher gets the terminal's Ctrl-C and passes it on to
    each process once.)
    """

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.pid = os.getpid()
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data-loader worker: the main process decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if local_rank() == 0:
            print("\nStopping after this batch and saving a resumable state "
                  "(Ctrl-C again to abort without saving)...", file=sys.stderr)

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop: all stop after the same batch, or
        their collectives would hang."""
        if all_reduce_sum([float(self.requested)], device)[0]:
            self.requested = True  # (never back to False: a Ctrl-C may arrive meanwhile)
        return self.requested

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def amp_context(device: torch.device, enabled: bool, say: Callable = print):
    """(autocast context, GradScaler or None): on CUDA bf16 where supported, else fp16 with a
    scaler; on a CPU that computes bfloat16 natively (cpu.native_bf16) bf16; on another CPU
    none. On a CPU, `say` is told in one line which it is."""
    if not enabled:
        return contextlib.nullcontext(), None
    if device.type == "cpu":
        unit = native_bf16()
        if unit is None:
            say(f"--amp: ignored: this CPU ({read_cpuinfo()[0] or 'unknown'}) has no unit that "
                "computes bfloat16 (AMX or AVX512-BF16), and emulated bf16 is slower than "
                "fp32; training runs in fp32", file=sys.stderr)
            return contextlib.nullcontext(), None
        say(f"--amp: bf16 autocast on this CPU ({read_cpuinfo()[0] or 'unknown'}: {unit}); "
            "weights and the optimizer stay in fp32")
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    compute_loss: Callable, loader: Iterable, device: torch.device, *,
                    totals: Totals | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format,
                    autocast: contextlib.AbstractContextManager | None = None,
                    scaler: torch.amp.GradScaler | None = None, stop: StopRequest | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    description: str = "train") -> Totals:
    """Train on each batch of `loader`; returns the `Totals`, added to `totals` if given.

    `compute_loss(model, images, labels)` returns (mean loss, logits); a batch with more
    than images and labels (data.Keyed's keys) passes the rest on to it. With a `stop`
    (StopRequest) it returns after the batch at which Ctrl-C was pressed, with
    `stop.requested` set. A `scheduler` steps after every batch.
    """
    totals = Totals() if totals is None else totals
    autocast = autocast or contextlib.nullcontext()
    model.train()
    with tqdm(loader, desc=description, leave=False, disable=True if distributed()[0] else None) \
            as bar:
        for images, labels, *more in bar:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, logits = compute_loss(model, images, labels, *more)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            totals.add(loss, logits, labels)
            bar.set_postfix(loss=f"{totals.loss / totals.images:.3f}")
            if stop is not None and stop.agreed(device):
                break
    return totals


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, compute_loss: Callable,
        train_loader: torch.utils.data.DataLoader, val_loader: torch.utils.data.DataLoader,
        device: torch.device, *, epochs: int, output: str, settings: dict,
        on_best: Callable[[dict], None], title: str, resume: str | None = None,
        amp: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
        epoch_metrics: Callable[[], dict] | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        tensorboard: str | None = None) -> list[EpochRecord]:
    """Train for `epochs`, validating after each, and call `on_best(metrics)` on a new best.

    `train_loader` takes its order from a data.EpochSampler; `settings` are what a
    resumed run must keep. Ctrl-C saves <output>.state.pth and raises Interrupted (and
    each finished epoch saves it: save_epoch_state());
    `resume` continues from such a file exactly as if never stopped. Under torchrun
    the model is wrapped in DistributedDataParallel and rank 0 alone writes files.
    `epoch_metrics()`, if given, returns more figures (a dict) for each epoch's record;
    `on_epoch(record)`, if given, is told each finished epoch's record (on rank 0).
    A `scheduler` (Recipe.make_scheduler) steps after every batch; each record holds
    the learning rate the epoch ended at. `tensorboard`: a folder rank 0 writes each
    epoch's figures to (tensorboard_log.EpochLog; a resumed run continues its curves).
    Returns the per-epoch history (also <output>.history.json and .png).
    """
    rank, world = distributed()
    state_path = output_path(output, "state.pth")
    network = data_parallel(model, device)
    autocast, scaler = amp_context(device, amp, say=print if rank == 0 else lambda *a, **k: None)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: pick fastest kernels
    progress = Progress()
    if resume:
        progress = load_training_state(resume, model, optimizer, scaler, device, settings, epochs,
                                       scheduler)
        if rank == 0:
            print(f"Resuming from {resume}: epoch {progress.epoch + 1}, "
                  f"{progress.samples_done * world} images done")
    else:
        refuse_pending_state(state_path, device)
    board = EpochLog(tensorboard, progress.epoch) if tensorboard and rank == 0 else None
    with StopRequest() as stop, contextlib.closing(board) if board else contextlib.nullcontext():
        for epoch in range(progress.epoch, epochs):
            progress.epoch, started, carried = epoch, time.perf_counter(), progress.totals.images
            train_loader.sampler.set_epoch(epoch, progress.samples_done)
            train_one_epoch(network, optimizer, compute_loss, train_loader, device,
                            totals=progress.totals, memory_format=memory_format,
                            autocast=autocast, scaler=scaler, stop=stop, scheduler=scheduler,
                            description=f"{title} epoch {epoch + 1}/{epochs}")
            # by this process since it (re)started; after a resume rank 0's totals began with
            # all processes' sums of the epoch so far, which keeps the loss sum's order exact
            trained = progress.totals.images - carried
            progress.samples_done += trained
            progress.totals = progress.totals.all_reduced(device)
            if stop.requested:
                if rank == 0:
                    save_training_state(state_path, model, optimizer, scaler, device, progress,
                                        settings, scheduler)
                raise Interrupted(f"Saved the state after {progress.samples_done * world} images "
                                  f"of epoch {epoch + 1} to {state_path}; add --resume "
                                  f"{state_path} to the same command to continue.")
            trained = round(all_reduce_sum([trained], device)[0])
            train_seconds = time.perf_counter() - started  # the training part alone
            share_buffers_of_rank_0(model)
            # the bare model: shards of the val split may differ in length by one batch,
            # and DDP's forward would wait for a process that has finished
            val = evaluate(model, val_loader, device, len(val_loader.dataset.class_names))
            record = epoch_record(epoch, progress.totals, val, trained, train_seconds, started)
            if scheduler is not None:  # (a constant rate is in the checkpoint's settings)
                record["lr"] = optimizer.param_groups[0]["lr"]
            more = epoch_metrics() if epoch_metrics else {}
            record.update(more)
            progress.history.append(record)
            is_best = val["accuracy"] > progress.best
            if is_best:
                progress.best = val["accuracy"]
            if rank == 0:
                if is_best:
                    with said_on_full_disk(output, progress.history[:-1], epoch + 1):
                        on_best(dict(record, per_class_accuracy=val["per_class_accuracy"],
                                     confusion=val["confusion"]))
                print(f"{title} epoch {epoch + 1}/{epochs}: {describe(record)}"
                      f"{'  (best, saved)' if is_best else ''} | "
                      + "".join(f"{name} {value:g}, " for name, value in more.items()) +
                      f"{(record['images_per_second'] or 0):.1f} img/s, {record['seconds']:.0f}s",
                      flush=True)
                if epoch + 1 < epochs:
                    save_epoch_state(state_path, model, optimizer, scaler, device, progress,
                                     settings, scheduler)
                with said_on_full_disk(output, progress.history, epoch + 1):
                    save_history(progress.history, output_path(output, "history.json"), title)
                if on_epoch:
                    on_epoch(record)
                if board:
                    board.log(record)
            progress.samples_done, progress.totals = 0, Totals()
    if rank == 0 and os.path.exists(state_path):
        os.remove(state_path)
    return progress.history


def save_epoch_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, device: torch.device,
                     progress: Progress, settings: dict,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """After each epoch, the state --resume continues from at the next one's start: a run
    killed without Ctrl-C (a lost machine, the OOM killer) loses at most the epoch it was
    in. On a full disk the run goes on without it, saying so (its checkpoints are saved
    apart)."""
    at_next = Progress(epoch=progress.epoch + 1, history=progress.history, best=progress.best)
    try:
        save_training_state(path, model, optimizer, scaler, device, at_next, settings,
                            scheduler)
    except DiskFull as error:
        print(f"{error}: the state after epoch {progress.epoch + 1} was not saved; a killed "
              "run would start over", file=sys.stderr, flush=True)


@contextlib.contextmanager
def said_on_full_disk(output: str, saved: list[EpochRecord], epoch: int) -> Iterator[None]:
    """A full disk after `epoch` (counted from 1): what is kept (the best of the epochs
    `saved`, whose models reached the disk), and what to do."""
    try:
        yield
    except DiskFull as full:
        best = max(saved, key=lambda record: record["val_accuracy"], default=None)
        kept = (f"{output} keeps the best model so far (epoch {best['epoch']}, val "
                f"{best['val_accuracy']:.1%})" if best and os.path.exists(output)
                else "no model of this run was saved")
        raise UserError(f"{full}; stopped after epoch {epoch}: {kept}; make room and run the "
                        "same command again") from None


def epoch_record(epoch: int, totals: Totals, val: dict, trained: int, train_seconds: float,
                 started: float) -> EpochRecord:
    """One epoch's line of the history: losses, accuracies, speed."""
    return {"epoch": epoch + 1, "train_loss": totals.loss / max(totals.images, 1),
            "train_accuracy": totals.correct / max(totals.images, 1),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            # all processes together (with the few repeated to even out their shares);
            # validation not counted; None if a resumed epoch had no images left
            "images_per_second": round(trained / train_seconds, 3) if trained else None,
            "seconds": round(time.perf_counter() - started, 2)}


def describe(record: EpochRecord) -> str:
    """An epoch's losses and accuracies, as each epoch's line prints them."""
    return (f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.1%} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.1%}")


def save_history(history: list[EpochRecord], path: str, title: str) -> None:
    """The history as JSON and as loss and accuracy curves beside it (.png)."""
    write_json(history, path)
    plot_history(history, os.path.splitext(path)[0] + ".png", title)
