"""Stage 4: win back the pruned model's accuracy by knowledge distillation.

Reads  TEACHER (vgg16Net.pth)            the dense model from train.py (or a bare VGG
                                         state dict, like the original demo's)
       STUDENT (pruned_vgg16_net.pth)    the pruned model from pruner.py
       DATA/train/, DATA/val/            (made by split_dataset.py)
Writes OUTPUT (finetuned_vgg16_net.pth)  the student with the best validation accuracy
       finetuned_vgg16_net.history.json/.png, and .state.pth only after Ctrl-C

The student learns from the teacher's softened predictions and from the labels:

    loss = KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2
         + CrossEntropy(student, labels) * (1 - alpha)

    python knowledge_distillation.py             # T=8, alpha=0.99, Adam 1e-4, 20 epochs
"""
import os

import torch
import torch.nn.functional as F

from checkpoints import (atomic_save, check_made_for, check_replaceable, file_sha256,
                         load_checkpoint, make_checkpoint, model_from_checkpoint)
from cli import UserError, add_data_args, make_parser, positive_float, positive_int, run_cli
from data import find_classes, training_loaders
from distributed import init_distributed
from measure import evaluate
from training import MEMORY_FORMAT, fit


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, training=True)
    parser.add_argument("--teacher", default="vgg16Net.pth", help="dense checkpoint")
    parser.add_argument("--student", default="pruned_vgg16_net.pth", help="pruned checkpoint")
    parser.add_argument("--epochs", type=positive_int, default=20,
                        help="passes over the training set")
    parser.add_argument("--temperature", type=positive_float, default=8.0,
                        help="softening temperature T")
    parser.add_argument("--alpha", type=float, default=0.99,
                        help="weight of the distillation term (1 - alpha: the label term)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--output", default="finetuned_vgg16_net.pth", help="best student")
    parser.add_argument("--resume", metavar="STATE", help="continue an interrupted run")
    return parser


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return soft * alpha * temperature ** 2 + hard * (1 - alpha)


def main(args):
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: must be within 0..1")
    check_replaceable(args.output)
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    student_checkpoint = load_checkpoint(args.student, kinds=("pruned", "finetuned"))
    image_size = student_checkpoint["image_size"]
    normalization = student_checkpoint["normalization"]
    check_made_for(student_checkpoint, args.student, "--image-size", image_size=args.image_size)
    # (a bare state dict as the teacher is taken to be made for the student's size)
    teacher_checkpoint = load_checkpoint(args.teacher, kinds=("dense",), image_size=image_size)
    class_names = teacher_checkpoint["class_names"]
    check_made_for(teacher_checkpoint, args.teacher, f"the student {args.student}",
                   image_size=image_size, normalization=normalization)
    check_made_for(student_checkpoint, args.student, f"the teacher {args.teacher}",
                   class_names=class_names)
    train_folder = os.path.join(args.data, "train")
    check_made_for(teacher_checkpoint, args.teacher, train_folder,
                   class_names=find_classes(train_folder))
    train_loader, val_loader = training_loaders(args, image_size, device, normalization)

    teacher = model_from_checkpoint(teacher_checkpoint, args.teacher).eval()
    student = model_from_checkpoint(student_checkpoint, args.student)
    for network in (teacher, student):  # the batches arrive in this layout
        network.to(device, memory_format=MEMORY_FORMAT)
    before = evaluate(student, val_loader, device, len(class_names), progress="student before")
    teacher_accuracy = teacher_checkpoint["metrics"].get("val_accuracy")
    # (a bare state dict records none)
    teacher_val = "not recorded" if teacher_accuracy is None else f"{teacher_accuracy:.1%}"
    print(f"Distilling {args.teacher} (val {teacher_val} when trained) into "
          f"{args.student} (val {before['accuracy']:.1%} now) on {device}, "
          f"T={args.temperature:g}, alpha={args.alpha:g}, {image_size} px")
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, fused=True)

    # what a resumed run must keep, or it would not continue exactly: the flags, the
    # student's real image size, and the teacher (its path and, shortened, its checksum)
    teacher_sha256 = file_sha256(args.teacher)
    settings = {"batch_size": args.batch_size, "seed": args.seed, "crop_scale": args.crop_scale,
                "cache": args.cache, "lr": args.lr, "image_size": image_size, "amp": args.amp,
                "temperature": args.temperature, "alpha": args.alpha,
                "teacher": f"{args.teacher} (sha256 {teacher_sha256[:16]})"}

    def compute_loss(net, images, labels):
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = net(images)
        loss = distillation_loss(logits.float(), teacher_logits.float(), labels,
                                 args.temperature, args.alpha)
        return loss, logits

    def save_best(metrics):
        metrics.update(temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                       epochs=args.epochs, seed=args.seed, teacher=args.teacher,
                       teacher_sha256=teacher_sha256,
                       teacher_val_accuracy=teacher_accuracy,
                       student_val_accuracy_before=before["accuracy"],
                       pruning=student_checkpoint["metrics"])
        atomic_save(make_checkpoint(student, "finetuned", student_checkpoint["architecture"]["arch"],
                                    class_names, image_size, normalization, metrics), args.output)

    history = fit(student, optimizer, compute_loss, train_loader, val_loader, device,
                  epochs=args.epochs, output=args.output, settings=settings, on_best=save_best,
                  title="distill", resume=args.resume, amp=args.amp, memory_format=MEMORY_FORMAT)
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Student validation accuracy {before['accuracy']:.1%} -> {best['val_accuracy']:.1%} "
          f"(epoch {best['epoch']}); teacher {teacher_val}; saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
