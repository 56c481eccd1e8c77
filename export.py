"""Stage 6: ship the model as ONNX, in fp32 and int8, each checked before it is saved.

Reads  WEIGHTS (finetuned_vgg16_net.pth)  any checkpoint of this pipeline
       DATA/train/<class>/                --calibration pictures, for int8's value ranges
       DATA/val/<class>/                  to compare the int8 model with the fp32 one (the
                                          split that chooses; DATA/test/ is only reported)
Writes OUTPUT (finetuned_vgg16_net.onnx)  fp32; any batch size; onnxruntime and other runtimes
       finetuned_vgg16_net.int8.onnx      static post-training int8, about 4x smaller

Each file describes itself in its metadata: class names, image size, normalisation,
layer widths and the SHA-256 of the checkpoint it came from (the int8 file also how
it was quantised, and for which CPU), so test.py (and your own code) can use it
alone. Before saving, the fp32 file must compute what PyTorch computes, and the int8
file must stay within --int8-max-drop points of the fp32 file's accuracy on DATA/val
(else it is not saved, unless --force-int8); where the split holds a test part, both
files' accuracy there is printed beside it, and decides nothing.

int8 depends on the CPU that runs it: where uint8 x int8 products are summed in
saturating int16 (AVX2 or AVX-512 without VNNI), it is quantised with 7-bit weights
(onnxruntime's reduce_range), else with 8-bit ones. --int8-for names the CPU class
the file is for (default: this machine's).

    python export.py
    python export.py --weights vgg16Net.pth --calibration 64
    python export.py --int8-for avx512-vnni     # for a server with VNNI
"""
import os
import sys

from compress.checkpoints import check_made_for, load_checkpoint, output_path
from compress.cli import (CheckFailed, UserError, add_shared_flags, add_verbose_arg, make_parser,
                          points, positive_int, run_cli)
from compress.export import convert
from compress.machine.cpu import CPU_CLASSES, cpu_class
from compress.machine.resources import check_writable


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--weights", default="finetuned_vgg16_net.pth", help="checkpoint to export")
    add_shared_flags(parser, "--output", "--data",
                     output={"help": "the fp32 file (default: WEIGHTS with .onnx); the int8 one "
                                     "is beside it, with .int8.onnx"})
    parser.add_argument("--calibration", type=positive_int, default=128,
                        help="training pictures whose activations set int8's value ranges")
    add_shared_flags(parser, "--image-size", "--batch-size", "--workers", "--seed",
                     batch_size={"help": "pictures per batch when calibrating and comparing"},
                     workers={"default": 0, "help": "data-loading worker processes"},
                     seed={"help": "seed of the calibration sample"})
    parser.add_argument("--int8-for", choices=CPU_CLASSES, metavar="CPU",
                        help="CPU class the int8 file is for (default: this machine's, "
                             f"{cpu_class()}): " + "; ".join(
                                 f"{name}: {about}" for name, about in CPU_CLASSES.items()))
    parser.add_argument("--int8-max-drop", type=points, default=convert.INT8_MAX_DROP,
                        metavar="POINTS",
                        help="refuse to save an int8 file more than this many accuracy points "
                             "below the fp32 file on DATA/val (the split that chooses)")
    parser.add_argument("--force-int8", action="store_true",
                        help="save the int8 file even if it lost more than --int8-max-drop "
                             "(with a warning)")
    add_verbose_arg(parser, "the exporter's and the quantiser's messages")
    return parser


def main(args):
    if args.weights.endswith(".onnx"):
        raise UserError(f"--weights {args.weights}: already an exported model; give the "
                        "checkpoint (.pth) it came from")
    fp32_path = args.output or output_path(args.weights, "onnx")
    if not fp32_path.endswith(".onnx"):
        raise UserError(f"--output {fp32_path}: must end in .onnx (test.py knows an exported "
                        "model by it)")
    for path in (fp32_path, convert.int8_path_of(fp32_path)):  # before reading the weights
        convert.check_onnx_replaceable(path)
    check_writable(fp32_path, "--output")
    checkpoint = load_checkpoint(args.weights, image_size=args.image_size)
    check_made_for(checkpoint, args.weights, "--image-size", image_size=args.image_size)
    report = convert.export_checkpoint(checkpoint, args.weights, fp32_path, data=args.data,
                                       plan=convert.ExportPlan.from_args(args))

    written = [fp32_path, report["int8_path"]] if report["int8_saved"] else [fp32_path]
    sizes = {path: os.path.getsize(path) for path in [args.weights, *written]}
    print("Saved " + ", ".join(f"{path} ({sizes[path] / 2**20:.1f} MB)" for path in written)
          + (f"; the int8 file is {sizes[report['int8_path']] / sizes[args.weights]:.0%} of "
             f"{args.weights}" if report["int8_saved"] else ""))
    if report["int8_lost_points"] > args.int8_max_drop:
        refuse_lossy_int8(args, report)


def refuse_lossy_int8(args, report):
    """An int8 file that lost more than --int8-max-drop points: a loud warning where it was
    saved all the same (--force-int8), else a CheckFailed (exit status 1)."""
    accuracy, int8_path = report["accuracy"], report["int8_path"]
    what = (f"{int8_path} lost {report['int8_lost_points']:.2f} points against the fp32 file "
            f"on {args.data}/{report['split']} ({accuracy['int8']:.1%} vs {accuracy['fp32']:.1%}) "
            "on this CPU "
            f"({report['cpu']}), more than --int8-max-drop {args.int8_max_drop:g}")
    if args.force_int8:
        print(f"WARNING: {what}; saved anyway (--force-int8)", file=sys.stderr)
        return
    hint = "" if report["settings"]["reduce_range"] else "--int8-for avx2 (7-bit weights), "
    kept = " (the earlier one there is left as it was)" if os.path.exists(int8_path) else ""
    raise CheckFailed(f"{what}: not saved{kept}; try {hint}more --calibration pictures, or "
                      "--force-int8 to save it anyway")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
