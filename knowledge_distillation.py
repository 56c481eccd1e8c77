"""Stage 4: win back the pruned model's accuracy by knowledge distillation.

Reads  TEACHER (vgg16Net.pth)            the dense model from train.py (or a bare VGG
                                         state dict, like the original demo's)
       STUDENT (pruned_vgg16_net.pth)    the pruned model from pruner.py
       DATA/train/, DATA/val/            (made by split_dataset.py)
Writes OUTPUT (finetuned_vgg16_net.pth)  the student with the best validation accuracy
       finetuned_vgg16_net.history.json/.png, and .state.pth only after Ctrl-C

With --student-arch mobilenet_v2 the student is torchvision's MobileNetV2 instead
of the pruned VGG (new weights, or --pretrained PATH), written to
finetuned_mobilenet_v2.pth: the light design to weigh against pruning.

The student learns from the teacher's softened predictions and from the labels:

    loss = KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2
         + CrossEntropy(student, labels) * (1 - alpha)

    python knowledge_distillation.py             # T=8, alpha=0.99, Adam 1e-4, 20 epochs
    python knowledge_distillation.py --student-arch mobilenet_v2 --epochs 10
"""
import os

import torch
import torch.nn.functional as F

import model as vgg

from checkpoints import (atomic_save, check_made_for, check_replaceable, file_sha256,
                         load_checkpoint, make_checkpoint, model_from_checkpoint,
                         safe_load, is_state_dict)
from cli import UserError, add_data_args, make_parser, positive_float, positive_int, run_cli
from data import find_classes, training_loaders
from distributed import init_distributed
from measure import evaluate
from training import MEMORY_FORMAT, fit


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, training=True)
    parser.add_argument("--teacher", default="vgg16Net.pth", help="dense checkpoint")
    parser.add_argument("--student", help="pruned checkpoint (default: pruned_vgg16_net.pth)")
    parser.add_argument("--student-arch", choices=["pruned", vgg.MOBILENET_V2], default="pruned",
                        help="pruned: the --student checkpoint; mobilenet_v2: torchvision's "
                             "MobileNetV2, new or from --pretrained, for the teacher's classes, "
                             "image size and normalisation")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="--student-arch mobilenet_v2: start from this torchvision "
                             "MobileNetV2 state dict (its ImageNet file, "
                             "mobilenet_v2-b0353104.pth); the last layer starts new")
    parser.add_argument("--epochs", type=positive_int, default=20,
                        help="passes over the training set")
    parser.add_argument("--temperature", type=positive_float, default=8.0,
                        help="softening temperature T")
    parser.add_argument("--alpha", type=float, default=0.99,
                        help="weight of the distillation term (1 - alpha: the label term)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--output", help="best student (default: finetuned_vgg16_net.pth, or "
                                         "finetuned_mobilenet_v2.pth for --student-arch "
                                         "mobilenet_v2)")
    parser.add_argument("--resume", metavar="STATE", help="continue an interrupted run")
    return parser


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return soft * alpha * temperature ** 2 + hard * (1 - alpha)


DEFAULT_STUDENT = "pruned_vgg16_net.pth"
DEFAULT_OUTPUT = {"pruned": "finetuned_vgg16_net.pth",
                  vgg.MOBILENET_V2: "finetuned_mobilenet_v2.pth"}


def pruned_student(args):
    """The --student checkpoint and its path; its image size is what both models see."""
    if args.pretrained:
        raise UserError("--pretrained: only with --student-arch mobilenet_v2 (a pruned student "
                        "starts from its checkpoint)")
    path = args.student or DEFAULT_STUDENT
    checkpoint = load_checkpoint(path, kinds=("pruned", "finetuned"))
    check_made_for(checkpoint, path, "--image-size", image_size=args.image_size)
    return checkpoint, path


def mobilenet_student(args, teacher_checkpoint):
    """A MobileNetV2 for the teacher's classes, pictures and normalisation, as a checkpoint
    (new weights, or torchvision's from --pretrained)."""
    if args.student:
        raise UserError("--student: not read with --student-arch mobilenet_v2, whose student "
                        "is a new MobileNetV2 (or --pretrained PATH)")
    class_names = teacher_checkpoint["class_names"]
    model = vgg.from_architecture({"arch": vgg.MOBILENET_V2, "batch_norm": True,
                                   "num_classes": len(class_names)})
    if args.pretrained:
        weights = safe_load(args.pretrained, "a torchvision MobileNetV2 state dict")
        try:
            if not is_state_dict(weights):
                raise ValueError("not a state dict of tensors")
            new = vgg.load_pretrained(model, weights)
        except ValueError as error:
            raise UserError(f"{args.pretrained}: not MobileNetV2 weights ({error})") from None
        print(f"Starting the student from {args.pretrained}; new {', '.join(sorted(new))}")
    return make_checkpoint(model, "new", vgg.MOBILENET_V2, class_names,
                           teacher_checkpoint["image_size"], teacher_checkpoint["normalization"],
                           {"student_arch": vgg.MOBILENET_V2, "pretrained": args.pretrained})


def main(args, on_epoch=None):
    """Distil; returns the history (one record per epoch). `on_epoch(record)`, if given, is
    told each epoch's figures (sweep.py's NNI trials report the validation accuracy to NNI's
    assessor)."""
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: must be within 0..1")
    output = args.output or DEFAULT_OUTPUT[args.student_arch]
    check_replaceable(output)
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    if args.student_arch == "pruned":
        student_checkpoint, student_path = pruned_student(args)
        image_size = student_checkpoint["image_size"]
        # (a bare state dict as the teacher is taken to be made for the student's size)
        teacher_checkpoint = load_checkpoint(args.teacher, kinds=("dense",), image_size=image_size)
    else:
        teacher_checkpoint = load_checkpoint(args.teacher, kinds=("dense",),
                                             image_size=args.image_size)
        check_made_for(teacher_checkpoint, args.teacher, "--image-size",
                       image_size=args.image_size)
        student_checkpoint = mobilenet_student(args, teacher_checkpoint)
        student_path = f"a new {vgg.MOBILENET_V2}"
        image_size = student_checkpoint["image_size"]
    normalization = student_checkpoint["normalization"]
    class_names = teacher_checkpoint["class_names"]
    check_made_for(teacher_checkpoint, args.teacher, f"the student {student_path}",
                   image_size=image_size, normalization=normalization)
    check_made_for(student_checkpoint, student_path, f"the teacher {args.teacher}",
                   class_names=class_names)
    train_folder = os.path.join(args.data, "train")
    check_made_for(teacher_checkpoint, args.teacher, train_folder,
                   class_names=find_classes(train_folder))
    train_loader, val_loader = training_loaders(args, image_size, device, normalization)

    teacher = model_from_checkpoint(teacher_checkpoint, args.teacher).eval()
    student = model_from_checkpoint(student_checkpoint, student_path)
    for network in (teacher, student):  # the batches arrive in this layout
        network.to(device, memory_format=MEMORY_FORMAT)
    before = evaluate(student, val_loader, device, len(class_names), progress="student before")
    teacher_accuracy = teacher_checkpoint["metrics"].get("val_accuracy")
    # (a bare state dict records none)
    teacher_val = "not recorded" if teacher_accuracy is None else f"{teacher_accuracy:.1%}"
    print(f"Distilling {args.teacher} (val {teacher_val} when trained) into "
          f"{student_path} (val {before['accuracy']:.1%} now) on {device}, "
          f"T={args.temperature:g}, alpha={args.alpha:g}, {image_size} px")
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, fused=True)

    # what a resumed run must keep, or it would not continue exactly: the flags, the
    # student's real image size, and the teacher (its path and, shortened, its checksum)
    teacher_sha256 = file_sha256(args.teacher)
    settings = {"batch_size": args.batch_size, "seed": args.seed, "crop_scale": args.crop_scale,
                "cache": args.cache, "lr": args.lr, "image_size": image_size, "amp": args.amp,
                "temperature": args.temperature, "alpha": args.alpha,
                "student": student_path, "pretrained": args.pretrained,
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
                       student=student_path, student_metrics=student_checkpoint["metrics"])
        atomic_save(make_checkpoint(student, "finetuned",
                                    student_checkpoint["architecture"]["arch"], class_names,
                                    image_size, normalization, metrics), output)

    history = fit(student, optimizer, compute_loss, train_loader, val_loader, device,
                  epochs=args.epochs, output=output, settings=settings, on_best=save_best,
                  title="distill", resume=args.resume, amp=args.amp, memory_format=MEMORY_FORMAT,
                  on_epoch=on_epoch)
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Student validation accuracy {before['accuracy']:.1%} -> {best['val_accuracy']:.1%} "
          f"(epoch {best['epoch']}); teacher {teacher_val}; saved {output}")
    return history


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
