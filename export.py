"""Stage 6: ship the model as ONNX, in fp32 and int8, each checked before it is saved.

Reads  WEIGHTS (finetuned_vgg16_net.pth)  any checkpoint of this pipeline
       DATA/train/<class>/                --calibration pictures, for int8's value ranges
       DATA/val/<class>/                  to compare the int8 model with the fp32 one
Writes OUTPUT (finetuned_vgg16_net.onnx)  fp32; any batch size; onnxruntime and other runtimes
       finetuned_vgg16_net.int8.onnx      static post-training int8, about 4x smaller

Each file describes itself in its metadata: class names, image size, normalisation,
layer widths and the SHA-256 of the checkpoint it came from (the int8 file also how
it was quantised, and for which CPU), so test.py (and your own code) can use it
alone. Before saving, the fp32 file must compute what PyTorch computes, and the int8
file must stay within --int8-max-drop points of the fp32 file's accuracy on
DATA/val (else it is not saved, unless --force-int8).

int8 depends on the CPU that runs it: where uint8 x int8 products are summed in
saturating int16 (AVX2 or AVX-512 without VNNI), it is quantised with 7-bit weights
(onnxruntime's reduce_range), else with 8-bit ones. --int8-for names the CPU class
the file is for (default: this machine's).

    python export.py
    python export.py --weights vgg16Net.pth --calibration 64
    python export.py --int8-for avx512-vnni     # for a server with VNNI
"""
import os
import shutil
import sys
import tempfile
import time

import torch

import deploy
from checkpoints import (check_made_for, file_sha256, load_checkpoint, model_from_checkpoint,
                         output_path)
from cli import (CheckFailed, UserError, image_size_type, make_parser, non_negative_int,
                 points, positive_int, run_cli)
from cpu import CPU_CLASSES, cpu_class, describe_cpu
from data import ImageFolder, eval_transform, find_classes, make_loader, val_set
from measure import relative_difference

# The fp32 file must compute what PyTorch does, up to this relative difference.
TOLERANCE = 1e-4
# The int8 file may lose at most this many accuracy points against the fp32 one.
INT8_MAX_DROP = 1.0
CPU = torch.device("cpu")


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--weights", default="finetuned_vgg16_net.pth", help="checkpoint to export")
    parser.add_argument("--output", help="the fp32 file (default: WEIGHTS with .onnx); the int8 "
                                         "one is beside it, with .int8.onnx")
    parser.add_argument("--data", default="dataset",
                        help="split dataset folder holding train/<class>/ and val/<class>/")
    parser.add_argument("--calibration", type=positive_int, default=128,
                        help="training pictures whose activations set int8's value ranges")
    parser.add_argument("--image-size", type=image_size_type,
                        help="square input size in pixels (default: the one stored in the "
                             "checkpoint)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="pictures per batch when calibrating and comparing")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="data-loading worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.add_argument("--int8-for", choices=CPU_CLASSES, metavar="CPU",
                        help="CPU class the int8 file is for (default: this machine's, "
                             f"{cpu_class()}): " + "; ".join(
                                 f"{name}: {about}" for name, about in CPU_CLASSES.items()))
    parser.add_argument("--int8-max-drop", type=points, default=INT8_MAX_DROP,
                        metavar="POINTS",
                        help="refuse to save an int8 file more than this many accuracy points "
                             "below the fp32 file on DATA/val")
    parser.add_argument("--force-int8", action="store_true",
                        help="save the int8 file even if it lost more than --int8-max-drop "
                             "(with a warning)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the exporter's and the quantiser's messages")
    return parser


def calibration_pictures(args, checkpoint):
    """The training pictures as the model sees them (evaluation transform)."""
    return ImageFolder(os.path.join(args.data, "train"),
                       eval_transform(checkpoint["image_size"], checkpoint["normalization"]),
                       checkpoint["class_names"])


def calibration_batches(args, pictures):
    """--calibration of `pictures`, a seeded sample, in batches."""
    order = torch.randperm(len(pictures), generator=torch.Generator().manual_seed(args.seed))
    sample = torch.utils.data.Subset(pictures, order[:args.calibration].tolist())
    for images, _ in make_loader(sample, args.batch_size, args.workers, CPU, sampler=None):
        yield images


def predictions(models, loader):
    """Every model's top-1 class for each picture of `loader`, and the true classes."""
    outputs, labels = {name: [] for name in models}, []
    with torch.inference_mode():
        for images, batch_labels in loader:
            labels.append(batch_labels)
            for name, model in models.items():
                outputs[name].append(model(images).argmax(1))
    return {name: torch.cat(tops) for name, tops in outputs.items()}, torch.cat(labels)


def main(args):
    if args.weights.endswith(".onnx"):
        raise UserError(f"--weights {args.weights}: already an exported model; give the "
                        "checkpoint (.pth) it came from")
    fp32_path = args.output or output_path(args.weights, "onnx")
    if not fp32_path.endswith(".onnx"):
        raise UserError(f"--output {fp32_path}: must end in .onnx (test.py knows an exported "
                        "model by it)")
    int8_path = fp32_path[:-len(".onnx")] + ".int8.onnx"
    for path in (fp32_path, int8_path):
        deploy.check_replaceable(path)
    checkpoint = load_checkpoint(args.weights, image_size=args.image_size)
    check_made_for(checkpoint, args.weights, "--image-size", image_size=args.image_size)
    val_folder = os.path.join(args.data, "val")
    train_folder = os.path.join(args.data, "train")
    for data_folder in (val_folder, train_folder):
        check_made_for(checkpoint, args.weights, data_folder,
                       class_names=find_classes(data_folder))
    model = model_from_checkpoint(checkpoint, args.weights).eval()
    pictures = calibration_pictures(args, checkpoint)
    val_loader = make_loader(val_set(args.data, checkpoint["image_size"], checkpoint["class_names"],
                                     normalization=checkpoint["normalization"]),
                             args.batch_size, args.workers, CPU, sampler=None)
    description = deploy.describe(checkpoint, args.weights, file_sha256(args.weights))

    # written beside the outputs, then renamed into place: nothing half-written is left
    folder = os.path.dirname(os.path.abspath(fp32_path))
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=folder, prefix=".export-")
    saved = False
    try:
        started = time.perf_counter()
        print(f"Exporting {args.weights} ({checkpoint['kind']}, {checkpoint['image_size']} px) "
              "to ONNX ...", flush=True)
        fp32_scratch = os.path.join(scratch, "fp32.onnx")
        deploy.export_onnx(model, fp32_scratch, description, args.verbose)
        fp32 = deploy.load_onnx(fp32_scratch)[1]
        images = next(iter(val_loader))[0]
        with torch.inference_mode():
            expected = model(images)
            difference = relative_difference(fp32(images), expected)
        if not difference <= TOLERANCE:  # NaN too
            raise CheckFailed(f"the ONNX model differs from {args.weights} by {difference:.1e} "
                              f"(relative, more than {TOLERANCE:g}) on {len(images)} pictures; "
                              "nothing was saved")
        print(f"  fp32 ONNX computes what PyTorch computes: max relative difference "
              f"{difference:.1e} on {len(images)} pictures ({time.perf_counter() - started:.0f}s)")

        started = time.perf_counter()
        here = cpu_class()
        target = args.int8_for or here
        print(f"Quantizing to int8 for {target} CPUs"
              + ("" if target == here else f" (this one: {describe_cpu()})")
              + f", calibrated on {min(args.calibration, len(pictures))} pictures of "
              f"{train_folder} ...", flush=True)
        int8_scratch = os.path.join(scratch, "int8.onnx")
        settings = deploy.quantize_int8(fp32_scratch, int8_scratch,
                                        calibration_batches(args, pictures), target, args.verbose)
        int8 = deploy.load_onnx(int8_scratch)[1]
        tops, labels = predictions({"torch": model, "fp32": fp32, "int8": int8}, val_loader)
        accuracy = {name: (top == labels).float().mean().item() for name, top in tops.items()}
        agreement = (tops["int8"] == tops["fp32"]).float().mean().item()
        print(f"  {'7-bit' if settings['reduce_range'] else '8-bit'} weights per "
              f"{'channel' if settings['per_channel'] else 'tensor'}"
              + (" (reduce_range: u8 x s8 products saturate int16 there)"
                 if settings["reduce_range"] else ""))
        print(f"  on {len(labels)} pictures of {val_folder}, on this CPU ({here}): accuracy "
              f"PyTorch {accuracy['torch']:.1%}, ONNX fp32 {accuracy['fp32']:.1%}, int8 "
              f"{accuracy['int8']:.1%}; int8 agrees with fp32 on {agreement:.1%} "
              f"({time.perf_counter() - started:.0f}s)")
        lost = round(100 * (accuracy["fp32"] - accuracy["int8"]), 9)
        keep_int8 = lost <= args.int8_max_drop or args.force_int8

        if keep_int8:
            os.replace(int8_scratch, int8_path)
        os.replace(fp32_scratch, fp32_path)
        saved = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made_folder and not saved:
            shutil.rmtree(folder, ignore_errors=True)
    written = [fp32_path, int8_path] if keep_int8 else [fp32_path]
    sizes = {path: os.path.getsize(path) for path in [args.weights, *written]}
    print("Saved " + ", ".join(f"{path} ({sizes[path] / 2**20:.1f} MB)" for path in written)
          + (f"; the int8 file is {sizes[int8_path] / sizes[args.weights]:.0%} of "
             f"{args.weights}" if keep_int8 else ""))
    if lost > args.int8_max_drop:
        refuse_lossy_int8(args, int8_path, lost, accuracy, here, target)


def refuse_lossy_int8(args, int8_path, lost, accuracy, here, target):
    """An int8 file that lost more than --int8-max-drop points: a loud warning where it was
    saved all the same (--force-int8), else a CheckFailed (exit status 1)."""
    what = (f"{int8_path} lost {lost:.2f} points against the fp32 file on {args.data}/val "
            f"({accuracy['int8']:.1%} vs {accuracy['fp32']:.1%}) on this CPU ({here}), more "
            f"than --int8-max-drop {args.int8_max_drop:g}")
    if args.force_int8:
        print(f"WARNING: {what}; saved anyway (--force-int8)", file=sys.stderr)
        return
    hint = "" if deploy.int8_settings(target)["reduce_range"] else \
        "--int8-for avx2 (7-bit weights), "
    kept = " (the earlier one there is left as it was)" if os.path.exists(int8_path) else ""
    raise CheckFailed(f"{what}: not saved{kept}; try {hint}more --calibration pictures, or "
                      "--force-int8 to save it anyway")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
