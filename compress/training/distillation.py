"""Knowledge distillation: a student learns from the dense teacher's softened predictions.

    loss = KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2
         + CrossEntropy(student, labels) * (1 - alpha)

or, with --kd-loss mse, MSE(student logits, teacher logits) * alpha in place of the KL
term (the seed material's other KD loss; T is not used); with --feature-weight W,
W * the feature loss (features.py: the blocks' feature maps matched) is added.

- `Distillation`: those settings (--temperature, --alpha, --kd-loss, --feature-weight),
  from the flags by `Distillation.from_args()`, saved whole with the student.
- `distillation_loss()`: the logit loss, per batch.
- `distil()`: train a student from a teacher (training.fit: validation, the best
  checkpoint, the history, Ctrl-C and --resume, torchrun); returns the history.
- `distil_checkpoint()`: what knowledge_distillation.py does with two checkpoints --
  the checks that they fit each other and the data, the loaders, `distil()`, and the
  best student saved as a finetuned checkpoint. The sweep calls it with the teacher's
  checkpoint read once.
- `mobilenet_student()`: a new (or --pretrained) MobileNetV2 checkpoint for the
  teacher's classes, pictures and normalisation: the light design to weigh against
  pruning.

    teacher = load_checkpoint("vgg16Net.pth", kinds=("dense",))
    student = load_checkpoint("pruned_vgg16_net.pth", kinds=("pruned",))
    torch.manual_seed(0)  # the dropout's draws
    history = distil_checkpoint(teacher, "vgg16Net.pth", student, "pruned_vgg16_net.pth",
                                data="dataset", output="student.pth",
                                recipe=Recipe(epochs=20, lr=1e-4),
                                distillation=Distillation(temperature=4, alpha=0.9))
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import model as vgg
from compress.checkpoints import (Checkpoint, atomic_save, check_made_for, file_sha256,
                                  is_state_dict, make_checkpoint, model_from_checkpoint,
                                  safe_load, saved_bytes)
from compress.cli import ALPHA, KD_LOSSES, TEMPERATURE, UserError, settings_from
from compress.data.pictures import find_classes
from compress.machine.distributed import init_distributed
from compress.machine.resources import check_room
from compress.measure.evaluation import evaluate
from compress.pruning.weights import keep_zeros
from compress.training.features import Hints, WithAdapters, feature_loss
from compress.training.loop import MEMORY_FORMAT, EpochRecord, fit
from compress.training.recipe import Recipe
from compress.training.tensorboard_log import run_folder
from compress.training.teacher_store import TeacherStore, check_store_file, store_key

def check_alpha(alpha: float) -> None:
    """UserError unless the distillation term's weight `alpha` is within 0..1."""
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: must be within 0..1")


@dataclasses.dataclass(frozen=True)
class Distillation:
    """What a student learns from the teacher: knowledge_distillation.py's and sweep.py's
    flags, each field named as its flag (the defaults: the original demo's).

    Args:
        temperature: T, softening both models' logits for the KL term.
        alpha: the weight of the teacher's term; 1 - alpha, the labels'.
        kd_loss: kl (on softened logits) or mse (on the logits themselves).
        feature_weight: the weight of the feature loss (features.py); 0: none.
    """
    temperature: float = TEMPERATURE
    alpha: float = ALPHA
    kd_loss: str = "kl"
    feature_weight: float = 0.0

    def __post_init__(self):
        check_alpha(self.alpha)
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss {self.kd_loss!r}: one of {KD_LOSSES}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Distillation:
        """The settings of the distillation flags."""
        return settings_from(cls, args)

    def settings(self) -> dict:
        """All of them, as saved with the student and compared on --resume and by the sweep."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """As the distillation's first line says it."""
        loss = (f"T={self.temperature:g}, alpha={self.alpha:g}" if self.kd_loss == "kl"
                else f"MSE on the logits, alpha={self.alpha:g}")
        return loss + (f", feature weight {self.feature_weight:g}" if self.feature_weight else "")


DISTILLATION_DEFAULTS = Distillation().settings()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float,
                      label_smoothing: float = 0.0, kd_loss: str = "kl") -> torch.Tensor:
    """The batch's mean distillation loss on the logits (see the module's docstring); KL
    per picture. `labels`: class indices, or class probabilities (mixed pictures)."""
    if kd_loss == "mse":
        soft = F.mse_loss(student_logits, teacher_logits) * alpha
    else:  # (in this order: the original demo's losses, bit for bit)
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                        F.softmax(teacher_logits / temperature, dim=1),
                        reduction="batchmean") * alpha * temperature ** 2
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return soft + hard * (1 - alpha)


def mixed_targets(labels: torch.Tensor, mixes: torch.Tensor, classes: int) -> torch.Tensor:
    """The class probabilities of mixed pictures (data.Mixed): `labels` (the larger share's
    class) and `mixes` ([the other class, the share of `labels`] per picture)."""
    share = mixes[:, 1:].to(torch.float32)
    other = F.one_hot(mixes[:, 0].long(), classes).to(share.device)
    return share * F.one_hot(labels, classes) + (1 - share) * other


def mobilenet_student(teacher_checkpoint: Checkpoint, pretrained: str | None = None,
                      say: Callable = print) -> Checkpoint:
    """A MobileNetV2 for the teacher's classes, pictures and normalisation, as a checkpoint
    (new weights, or torchvision's from the state dict file `pretrained`)."""
    class_names = teacher_checkpoint["class_names"]
    model = vgg.from_architecture({"arch": vgg.MOBILENET_V2, "batch_norm": True,
                                   "num_classes": len(class_names)})
    if pretrained:
        weights = safe_load(pretrained, "a torchvision MobileNetV2 state dict")
        try:
            if not is_state_dict(weights):
                raise ValueError("not a state dict of tensors")
            new = vgg.load_pretrained(model, weights)
        except ValueError as error:
            raise UserError(f"{pretrained}: not MobileNetV2 weights ({error})") from None
        say(f"Starting the student from {pretrained}; new {', '.join(sorted(new))}")
    return make_checkpoint(model, "new", vgg.MOBILENET_V2, class_names,
                           teacher_checkpoint["image_size"], teacher_checkpoint["normalization"],
                           {"student_arch": vgg.MOBILENET_V2, "pretrained": pretrained})


class TeacherTime:
    """How long the teacher's forward passes took, on how many pictures."""

    def __init__(self):
        self.seconds, self.pictures = 0.0, 0
        self.last = (time.perf_counter(), 0.0)  # (when, self.seconds then)

    def share_since_last(self) -> dict[str, float]:
        """{"teacher_share": the teacher's share of the time since the last call} (an
        epoch's, when training.fit asks after each)."""
        now, (then, seconds_then) = time.perf_counter(), self.last
        self.last = (now, self.seconds)
        return {"teacher_share": round((self.seconds - seconds_then) / max(now - then, 1e-9), 3)}

    def __call__(self, teacher: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """`teacher`, timed."""
        def timed(images):
            started = time.perf_counter()
            logits = teacher(images)
            self.seconds += time.perf_counter() - started
            self.pictures += len(images)
            return logits
        return timed


def distil(teacher: torch.nn.Module, student: torch.nn.Module, loaders: tuple, device: torch.device,
           *, recipe: Recipe, distillation: Distillation = Distillation(),
           output: str, settings: dict, save_best: Callable[[dict], None],
           resume: str | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
           store: TeacherStore | None = None, teacher_time: TeacherTime | None = None,
           zeros_kept: bool = False, tensorboard: str | None = None) -> list[EpochRecord]:
    """Train `student` from `teacher` (both on `device`, in MEMORY_FORMAT) as `recipe` says
    (its optimizer, schedule, epochs, --amp; its label smoothing on the label term) and
    `distillation` (the loss) on `loaders` (train, val); returns the history (a record
    per epoch). With a feature weight, the student trains with its adapters
    (features.WithAdapters) and the teacher runs on every picture (give no `store`).

    `save_best(metrics)` is called on each new best validation accuracy; `output` names
    the history and the Ctrl-C state beside it, `settings` what a resumed run must keep
    (training.fit). `on_epoch(record)`, if given, is told each epoch's figures. With a
    `store` (the train loader keyed, data.Keyed), the teacher's logits are read from it
    where it has them, and it is saved as the run ends, Ctrl-C too. `teacher_time` adds
    up the teacher's forward passes; each epoch's record holds its share of the time
    ("teacher_share"). `zeros_kept`: the student's zero weights stay zero (single weights
    pruned: pruning/weights.py). `tensorboard`: the folder of its TensorBoard run.
    """
    weight = distillation.feature_weight
    if weight and store is not None:
        raise ValueError("feature distillation runs the teacher on every picture: no store")
    trained = WithAdapters(student, teacher).to(device, memory_format=MEMORY_FORMAT) \
        if weight else student
    hints = Hints(teacher) if weight else None
    optimizer = recipe.make_optimizer(trained)
    if zeros_kept:
        keep_zeros(student, optimizer)
    scheduler = recipe.make_scheduler(optimizer, len(loaders[0]))
    teacher_time = teacher_time or TeacherTime()
    answer = teacher_time(teacher)

    def compute_loss(net, images, labels, keys=None, mixes=None):
        with torch.no_grad():
            teacher_logits = answer(images) if store is None else \
                store.logits(images, keys, answer)
        logits = net(images)
        if weight:
            logits, adapted = logits
        targets = labels if mixes is None else mixed_targets(labels, mixes, logits.shape[1])
        loss = distillation_loss(logits.float(), teacher_logits.float(), targets,
                                 distillation.temperature, distillation.alpha,
                                 recipe.label_smoothing, distillation.kd_loss)
        if weight:
            loss = loss + weight * feature_loss(adapted, hints.taken())
        return loss, logits

    train_loader, val_loader = loaders
    try:
        history = fit(trained, optimizer, compute_loss, train_loader, val_loader, device,
                      epochs=recipe.epochs, output=output, settings=settings,
                      on_best=save_best, title="distill", resume=resume, amp=recipe.amp,
                      memory_format=MEMORY_FORMAT, on_epoch=on_epoch, scheduler=scheduler,
                      epoch_metrics=teacher_time.share_since_last, tensorboard=tensorboard)
    except BaseException:  # Ctrl-C, a failure: keep what the teacher answered, if one can
        if store is not None:
            with contextlib.suppress(Exception):  # the first error is the one to tell
                store.save()
        raise
    finally:
        if weight:
            hints.remove()
            trained.hints.remove()
    if store is not None:
        store.save()
    return history


def check_pair(teacher_checkpoint: Checkpoint, teacher_path: str, student_checkpoint: Checkpoint,
               student_path: str, data: str) -> None:
    """Refuse a teacher and a student made for other pictures, classes or normalisation than
    each other, or a DATA/train of other classes."""
    check_made_for(teacher_checkpoint, teacher_path, f"the student {student_path}",
                   image_size=student_checkpoint["image_size"],
                   normalization=student_checkpoint["normalization"])
    check_made_for(student_checkpoint, student_path, f"the teacher {teacher_path}",
                   class_names=teacher_checkpoint["class_names"])
    train_folder = os.path.join(data, "train")
    check_made_for(teacher_checkpoint, teacher_path, train_folder,
                   class_names=find_classes(train_folder))


def distil_checkpoint(teacher_checkpoint: Checkpoint, teacher_path: str,
                      student_checkpoint: Checkpoint, student_path: str, *, data: str,
                      output: str, recipe: Recipe,
                      distillation: Distillation = Distillation(),
                      device: str | torch.device = "auto", teacher_sha256: str | None = None,
                      pretrained: str | None = None, resume: str | None = None,
                      on_epoch: Callable[[EpochRecord], None] | None = None,
                      teacher_cache: str | None = None, tensorboard: str | None = None,
                      say: Callable = print) -> list[EpochRecord]:
    """Distil `student_checkpoint` (read from `student_path`, or a new MobileNetV2's) from
    `teacher_checkpoint` on the split in `data` with `recipe`; the best student is saved to
    `output` as a finetuned checkpoint, with `recipe` and `distillation` (the loss). A
    student of single weights pruned (its metrics' "unstructured") keeps its zeros.
    Returns the history.

    `teacher_sha256`: the SHA-256 of the teacher's file if the caller has it already (the
    sweep, distilling many students from one teacher read once), else read from
    `teacher_path`. `device`: a torch.device, or --device's text (under torchrun each
    process takes its own GPU). `teacher_cache`: the file of a TeacherStore, which
    answers for the teacher on the pictures it has seen (teacher_store.py).
    `tensorboard`: --tensorboard DIR, its run named after `output` (tensorboard_log.py).

    The random stream that dropout draws from is the caller's to seed (the stages seed it
    with --seed before making the student): both models are built here from their
    checkpoints, and their initialisation draws from it first, as it always has, so the
    same seed gives the same student however it is called.
    """
    device = init_distributed(device) if isinstance(device, str) else device
    check_pair(teacher_checkpoint, teacher_path, student_checkpoint, student_path, data)
    image_size = student_checkpoint["image_size"]
    normalization = student_checkpoint["normalization"]
    class_names = teacher_checkpoint["class_names"]
    if distillation.feature_weight and teacher_cache is not None:
        say("(--feature-weight: the teacher runs on every picture, its feature maps are not "
            f"stored; {teacher_cache} is neither read nor written)")
        teacher_cache = None
    if teacher_cache is not None:
        check_store_file(teacher_cache)  # before the pictures are read
    teacher_sha256 = teacher_sha256 or file_sha256(teacher_path)
    loaders = recipe.loaders(data, image_size, device, normalization,
                             keyed=teacher_cache is not None)
    store = None if teacher_cache is None else TeacherStore(teacher_cache, store_key(
        teacher_sha256, loaders[0].dataset, recipe, image_size=image_size,
        normalization=normalization, device=device), say=say)
    teacher = model_from_checkpoint(teacher_checkpoint, teacher_path)
    student = model_from_checkpoint(student_checkpoint, student_path)
    check_room(output, saved_bytes(student_checkpoint["state_dict"]),
               "the student's checkpoint")
    for network in (teacher.eval(), student):  # the batches arrive in this layout
        network.to(device, memory_format=MEMORY_FORMAT)
    before = evaluate(student, loaders[1], device, len(class_names), progress="student before")
    teacher_accuracy = teacher_checkpoint["metrics"].get("val_accuracy")
    # (a bare state dict records none)
    teacher_val = "not recorded" if teacher_accuracy is None else f"{teacher_accuracy:.1%}"
    say(f"Distilling {teacher_path} (val {teacher_val} when trained) into "
        f"{student_path} (val {before['accuracy']:.1%} now) on {device}, "
        f"{distillation.describe()}, {image_size} px")
    # what a resumed run must keep, or it would not continue exactly: the flags, the
    # student's real image size, and the teacher (its path and, shortened, its checksum)
    settings = dict(recipe.resume_settings(image_size), **distillation.settings(),
                    student=student_path, pretrained=pretrained,
                    teacher=f"{teacher_path} (sha256 {teacher_sha256[:16]})")

    def save_best(metrics):
        metrics.update(teacher=teacher_path,
                       teacher_sha256=teacher_sha256,
                       teacher_val_accuracy=teacher_accuracy,
                       student_val_accuracy_before=before["accuracy"],
                       student=student_path, student_metrics=student_checkpoint["metrics"],
                       recipe=recipe.settings(), distillation=distillation.settings())
        if "unstructured" in student_checkpoint["metrics"]:  # kept by keep_zeros()
            metrics["unstructured"] = student_checkpoint["metrics"]["unstructured"]
        atomic_save(make_checkpoint(student, "finetuned",
                                    student_checkpoint["architecture"]["arch"], class_names,
                                    image_size, normalization, metrics), output)

    teacher_time, started = TeacherTime(), time.perf_counter()
    history = distil(teacher, student, loaders, device, recipe=recipe,
                     distillation=distillation, output=output, settings=settings,
                     save_best=save_best, resume=resume, on_epoch=on_epoch, store=store,
                     teacher_time=teacher_time,
                     zeros_kept="unstructured" in student_checkpoint["metrics"],
                     tensorboard=tensorboard and run_folder(tensorboard, output))
    best = max(history, key=lambda r: r["val_accuracy"])
    say(f"Student validation accuracy {before['accuracy']:.1%} -> {best['val_accuracy']:.1%} "
        f"(epoch {best['epoch']}); teacher {teacher_val}; saved {output}")
    seconds = time.perf_counter() - started
    say(f"The teacher ran on {teacher_time.pictures} pictures in {teacher_time.seconds:.1f}s "
        f"({teacher_time.seconds / seconds:.0%} of the distillation's {seconds:.0f}s)"
        + (f"; {store.read} of its answers read back from {store.path}" if store else ""))
    return history
