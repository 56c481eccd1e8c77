"""Stage 6: ship the model as ONNX, in fp32 and int8, each checked before it is saved.

Reads  WEIGHTS (finetuned_vgg16_net.pth)  any checkpoint of this pipeline
       DATA/train/<class>/                --calibration pictures, for int8's value ranges
       DATA/val/<class>/                  to compare the int8 model with the fp32 one
Writes OUTPUT (finetuned_vgg16_net.onnx)  fp32; any batch size; onnxruntime and other runtimes
       finetuned_vgg16_net.int8.onnx      static post-training int8, about 4x smaller

Each file describes itself in its metadata: class names, image size, normalisation,
layer widths and the SHA-256 of the checkpoint it came from, so test.py (and your own
code) can use it alone. Before saving, the fp32 file must compute what PyTorch
computes; the int8 file's agreement with it and its accuracy are printed.

    python export.py
    python export.py --weights vgg16Net.pth --calibration 64
"""
import os
import shutil
import tempfile
import time

import torch

import deploy
from checkpoints import (check_made_for, file_sha256, load_checkpoint, model_from_checkpoint,
                         output_path)
from cli import (CheckFailed, UserError, image_size_type, make_parser, non_negative_int,
                 positive_int, run_cli)
from data import ImageFolder, eval_transform, find_classes, make_loader, val_set
from measure import relative_difference

# The fp32 file must compute what PyTorch does, up to this relative difference.
TOLERANCE = 1e-4
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
        print(f"Quantizing to int8, calibrated on {min(args.calibration, len(pictures))} "
              f"pictures of {train_folder} ...", flush=True)
        int8_scratch = os.path.join(scratch, "int8.onnx")
        deploy.quantize_int8(fp32_scratch, int8_scratch, calibration_batches(args, pictures),
                             args.verbose)
        int8 = deploy.load_onnx(int8_scratch)[1]
        tops, labels = predictions({"torch": model, "fp32": fp32, "int8": int8}, val_loader)
        accuracy = {name: (top == labels).float().mean().item() for name, top in tops.items()}
        agreement = (tops["int8"] == tops["fp32"]).float().mean().item()
        print(f"  on {len(labels)} pictures of {val_folder}: accuracy PyTorch "
              f"{accuracy['torch']:.1%}, ONNX fp32 {accuracy['fp32']:.1%}, int8 "
              f"{accuracy['int8']:.1%}; int8 agrees with fp32 on {agreement:.1%} "
              f"({time.perf_counter() - started:.0f}s)")

        os.replace(int8_scratch, int8_path)
        os.replace(fp32_scratch, fp32_path)
        saved = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made_folder and not saved:
            shutil.rmtree(folder, ignore_errors=True)
    sizes = {path: os.path.getsize(path) for path in (args.weights, fp32_path, int8_path)}
    print("Saved " + ", ".join(f"{path} ({size / 2**20:.1f} MB)" for path, size in sizes.items()
                               if path != args.weights)
          + f"; the int8 file is {sizes[int8_path] / sizes[args.weights]:.0%} of {args.weights}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
