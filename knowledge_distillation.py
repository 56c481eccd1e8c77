"""Stage 4: win back the pruned model's accuracy by knowledge distillation.

Reads  TEACHER (vgg16Net.pth)            the dense model from train.py
       STUDENT (pruned_vgg16_net.pth)    the pruned model from pruner.py
       DATA/train/, DATA/val/            (made by split_dataset.py)
Writes OUTPUT (finetuned_vgg16_net.pth)  the student with the best validation accuracy
       finetuned_vgg16_net.history.json/.png, and .state.pth only after Ctrl-C

The student learns from the teacher's softened predictions and from the labels:

    loss = KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2
         + CrossEntropy(student, labels) * (1 - alpha)

    python knowledge_distillation.py             # T=8, alpha=0.99, Adam 1e-4, 20 epochs
"""
import torch
import torch.nn.functional as F

from data import make_loader, training_sets
from utils import (UserError, add_data_args, atomic_save, check_classes, check_image_size,
                   evaluate, fit, init_distributed, load_checkpoint, make_checkpoint, make_parser,
                   model_from_checkpoint, positive_float, positive_int, run_cli)


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
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    teacher_checkpoint = load_checkpoint(args.teacher, kinds=("dense",))
    student_checkpoint = load_checkpoint(args.student, kinds=("pruned", "finetuned"))
    image_size = student_checkpoint["image_size"]
    check_image_size(student_checkpoint, args.student, args.image_size, "--image-size")
    check_image_size(teacher_checkpoint, args.teacher, image_size, f"the student {args.student}")
    class_names = teacher_checkpoint["class_names"]
    check_classes(student_checkpoint, args.student, class_names)
    train_set, val_set = training_sets(args, image_size)
    check_classes(teacher_checkpoint, args.teacher, train_set.class_names)
    val_loader = make_loader(val_set, args.batch_size, args.workers, device, sampler=None)

    # channels-last, as fit() makes the student: the batches arrive in that layout
    teacher = model_from_checkpoint(teacher_checkpoint, args.teacher).eval()
    teacher.to(device, memory_format=torch.channels_last)
    student = model_from_checkpoint(student_checkpoint, args.student).to(device)
    before = evaluate(student, val_loader, device, len(class_names), progress="student before")
    teacher_accuracy = teacher_checkpoint["metrics"].get("val_accuracy")
    print(f"Distilling {args.teacher} (val {teacher_accuracy:.1%} when trained) into "
          f"{args.student} (val {before['accuracy']:.1%} now) on {device}, "
          f"T={args.temperature:g}, alpha={args.alpha:g}, {image_size} px")
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, fused=True)

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
                       teacher_val_accuracy=teacher_accuracy,
                       student_val_accuracy_before=before["accuracy"],
                       pruning=student_checkpoint["metrics"])
        atomic_save(make_checkpoint(student, "finetuned", student_checkpoint["architecture"]["arch"],
                                    class_names, image_size, metrics), args.output)

    history = fit(student, optimizer, compute_loss, train_set, val_loader, args, device,
                  on_best=save_best, title="distill")
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Student validation accuracy {before['accuracy']:.1%} -> {best['val_accuracy']:.1%} "
          f"(epoch {best['epoch']}); teacher {teacher_accuracy:.1%}; saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
