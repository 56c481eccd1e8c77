"""Stage 4: win back the pruned model's accuracy by knowledge distillation.

Reads  TEACHER (vgg16Net.pth)            the dense model from train.py (or a bare VGG
                                         state dict, like the original demo's)
       STUDENT (pruned_vgg16_net.pth)    the pruned model from pruner.py
       DATA/train/, DATA/val/            (made by split_dataset.py)
Writes OUTPUT (finetuned_vgg16_net.pth)  the student with the best validation accuracy
       finetuned_vgg16_net.history.json/.png, and .state.pth only after Ctrl-C
       --teacher-cache PATH              the teacher's logits of every training picture and
                                         epoch, read back by the next student (optional)

With --student-arch mobilenet_v2 the student is torchvision's MobileNetV2 instead
of the pruned VGG (new weights, or --pretrained PATH), written to
finetuned_mobilenet_v2.pth: the light design to weigh against pruning.

The student learns from the teacher's softened predictions and from the labels:

    loss = KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2
         + CrossEntropy(student, labels) * (1 - alpha)

    python knowledge_distillation.py             # T=8, alpha=0.99, Adam 1e-4, 20 epochs
    python knowledge_distillation.py --kd-loss mse --feature-weight 1   # other losses
    python knowledge_distillation.py --student-arch mobilenet_v2 --epochs 10
    python knowledge_distillation.py --output s70.pth --student pruned70.pth \
        --teacher-cache teacher_logits.pt   # a second student: the teacher runs on no picture
"""
import torch

import model as vgg
from compress.checkpoints import check_made_for, check_replaceable, load_checkpoint
from compress.cli import (DISTILLATION_FLAGS, UserError, add_data_args, add_shared_flags,
                          make_parser, run_cli)
from compress.machine.distributed import init_distributed
from compress.machine.resources import check_writable, output_lock
from compress.training.distillation import Distillation, distil_checkpoint, mobilenet_student
from compress.training.recipe import Recipe

DEFAULT_STUDENT = "pruned_vgg16_net.pth"
DEFAULT_OUTPUT = {"pruned": "finetuned_vgg16_net.pth",
                  vgg.MOBILENET_V2: "finetuned_mobilenet_v2.pth"}


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
    add_shared_flags(parser, "--epochs", "--lr", *DISTILLATION_FLAGS, "--output", "--resume",
                     epochs={"default": 20}, lr={"default": 1e-4},
                     output={"help": "best student (default: finetuned_vgg16_net.pth, or "
                                     "finetuned_mobilenet_v2.pth for --student-arch "
                                     "mobilenet_v2)"})
    parser.add_argument("--teacher-cache", metavar="PATH",
                        help="keep the teacher's logits of every training picture and epoch in "
                             "this file, and read them back instead of running the teacher "
                             "(the pictures of epoch e are the same crops for every student): "
                             "a second student distilled from the same teacher, pictures and "
                             "seed runs the teacher on none it has seen. Refused if made for "
                             "another teacher or other pictures; safe to delete (rebuilt)")
    return parser


def pruned_student(args):
    """The --student checkpoint and its path; its image size is what both models see."""
    if args.pretrained:
        raise UserError("--pretrained: only with --student-arch mobilenet_v2 (a pruned student "
                        "starts from its checkpoint)")
    path = args.student or DEFAULT_STUDENT
    # (a bare state dict, pruned in someone's own code, is read for --image-size)
    checkpoint = load_checkpoint(path, kinds=("pruned", "finetuned"), image_size=args.image_size)
    check_made_for(checkpoint, path, "--image-size", image_size=args.image_size)
    return checkpoint, path


def main(args):
    if args.feature_weight and args.student_arch != "pruned":
        raise UserError("--feature-weight: needs a pruned VGG student (its blocks are matched to "
                        "the teacher's), not a MobileNetV2")
    output = args.output or DEFAULT_OUTPUT[args.student_arch]
    check_replaceable(output)
    check_writable(output, "--output")
    with output_lock(output, "--output"):
        distil_as_asked(args, output)


def distil_as_asked(args, output):
    """Distil as the flags say, into `output` (main() has checked it can be written)."""
    torch.manual_seed(args.seed)  # dropout's draws, and a new MobileNetV2's weights
    device = init_distributed(args.device)
    if args.student_arch == "pruned":
        student, student_path = pruned_student(args)
        # (a bare state dict as the teacher is taken to be made for the student's size)
        teacher = load_checkpoint(args.teacher, kinds=("dense",), image_size=student["image_size"])
    else:
        if args.student:
            raise UserError("--student: not read with --student-arch mobilenet_v2, whose "
                            "student is a new MobileNetV2 (or --pretrained PATH)")
        teacher = load_checkpoint(args.teacher, kinds=("dense",), image_size=args.image_size)
        check_made_for(teacher, args.teacher, "--image-size", image_size=args.image_size)
        student = mobilenet_student(teacher, args.pretrained)
        student_path = f"a new {vgg.MOBILENET_V2}"
    distil_checkpoint(teacher, args.teacher, student, student_path, data=args.data, output=output,
                      recipe=Recipe.from_args(args), distillation=Distillation.from_args(args),
                      device=device, pretrained=args.pretrained, resume=args.resume,
                      teacher_cache=args.teacher_cache, tensorboard=args.tensorboard)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
