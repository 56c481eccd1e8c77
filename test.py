"""Stage 5: measure a model -- its accuracy, one picture's prediction, or dense vs pruned.

Reads  vgg16Net.pth (prune_test = False) or finetuned_vgg16_net.pth (prune_test = True,
       or --pruned), or --weights PATH: a checkpoint, a bare VGG state dict (like the
       original demo's vgg16Net.pth) or an .onnx file from export.py (run in
       onnxruntime); DATA/test/<class>/ for accuracy (DATA/val/ where the split has no
       test part: checkpoints were chosen on val, which flatters them), each accuracy
       with its 95% interval, and in --compare each model against the first on the same
       pictures (a paired difference and its interval)
Writes <weights>.confusion.png            (accuracy mode)
       <image name>.prediction.png        (--image: the picture with its predicted class)
       compare.json, compare.png, <weights>.confusion.png for each model   (--compare)
       profile.json, profile.png          (--profile: each model's time, layer by layer)

    python test.py                         # accuracy of vgg16Net.pth on dataset/test (or val)
    python test.py --pruned                # ... of finetuned_vgg16_net.pth
    python test.py --image cat.jpg         # classify one picture
    python test.py --compare               # dense vs pruned vs distilled (vs int8, once
                                           # export.py ran), measured side by side
    python test.py --profile vgg16Net.pth finetuned_vgg16_net.int8.onnx
                                           # where their time goes, and why
"""
import dataclasses
import os

import torch

from compress.checkpoints import output_path, write_json
from compress.cli import (UserError, add_data_args, add_timing_args, add_verbose_arg, make_parser,
                          resolve_device, run_cli)
from compress.data.images import eval_transform, report_split
from compress.data.pictures import load_rgb
from compress.export.onnx_files import exported_earlier_note, other_cpu_note
from compress.machine.cpu import describe_cpu
from compress.machine.resources import check_writable
from compress.measure.comparison import THROUGHPUT_BATCH, compare, load_model, split_loader
from compress.measure.evaluation import evaluate
from compress.measure.intervals import accuracy_interval
from compress.measure.profiling import GEMM_SIZES, machine_peak, profile_model
from compress.measure.reporting import (explain_profiles, plot_confusion, plot_prediction,
                                        plot_profiles, print_comparison, print_profile,
                                        save_comparison)
from compress.measure.timing import PRECISION, TimingPlan

prune_test = False  # False: test the dense vgg16Net.pth; True: the distilled pruned model

WEIGHTS = {False: "vgg16Net.pth", True: "finetuned_vgg16_net.pth"}
COMPARED = [("dense", "vgg16Net.pth"), ("pruned", "pruned_vgg16_net.pth"),
            ("distilled", "finetuned_vgg16_net.pth"), ("int8", "finetuned_vgg16_net.int8.onnx")]


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser)
    parser.add_argument("--pruned", action="store_true",
                        help=f"test {WEIGHTS[True]} (same as prune_test = True)")
    parser.add_argument("--weights", metavar="PATH",
                        help="test this checkpoint (.pth) or exported model (.onnx) instead")
    parser.add_argument("--image", metavar="PATH", help="classify this one picture")
    parser.add_argument("--show", action="store_true", help="also open figures in a window")
    parser.add_argument("--compare", nargs="*", metavar="PATH",
                        help="measure these checkpoints side by side (default: "
                             + ", ".join(p for _, p in COMPARED) + ", those that exist)")
    parser.add_argument("--report", default="compare.json", help="JSON report of --compare")
    parser.add_argument("--profile", nargs="*", metavar="PATH",
                        help="where each model's time goes, layer by layer, at batch 1 and 32, "
                             "on the CPU: time, multiply-adds and their rate against this "
                             "machine's peak matrix-product speed, measured in the same run; "
                             "then each model's speed-up against the first, and why (default: "
                             "the --compare models that exist); writes profile.json and "
                             "profile.png")
    add_timing_args(parser, PRECISION)
    add_verbose_arg(parser)
    return parser


def load(path, args, device):
    """load_model() as the flags ask, with test.py's notes on .onnx files."""
    # onnxruntime on the CPU unless --device names CUDA: requirements.txt installs the CPU
    # build of onnxruntime, so --device auto's CUDA is not taken for granted
    onnx_device = device if args.device != "auto" else torch.device("cpu")
    checkpoint, model = load_model(path, device, args.image_size, onnx_device)
    if path.endswith(".onnx"):
        notes = [exported_earlier_note(path, checkpoint)]
        if onnx_device.type == "cpu":
            notes.append(other_cpu_note(path, checkpoint))
        for note in filter(None, notes):
            print(note, flush=True)
    return checkpoint, model


def test_accuracy(path, args, device):
    checkpoint, model = load(path, args, device)
    class_names = checkpoint["class_names"]
    split = report_split(args.data)
    loader = split_loader(args.data, checkpoint, path, device, args.batch_size, args.workers,
                          split)
    metrics = evaluate(model, loader, device, len(class_names), progress="evaluating")
    low, high = accuracy_interval(sum(metrics["hits"]), metrics["count"])
    print(f"{path}: accuracy {metrics['accuracy']:.2%} on {metrics['count']} images of "
          f"{os.path.join(args.data, split)} (95% interval {low:.1%} to {high:.1%})")
    for name, accuracy in zip(class_names, metrics["per_class_accuracy"]):
        print(f"  {name:<20} {accuracy:.2%}")
    figure = output_path(path, "confusion.png")
    plot_confusion(metrics, class_names, figure, os.path.basename(path), args.show)
    print(f"Confusion matrix: {figure}")


def classify(path, image_path, args, device):
    checkpoint, model = load(path, args, device)
    try:
        image = load_rgb(image_path)
    except FileNotFoundError:
        raise UserError(f"{image_path}: file not found") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{image_path}: not a readable image ({error})") from None
    transform = eval_transform(checkpoint["image_size"], checkpoint["normalization"])
    batch = transform(image).unsqueeze(0).to(device)
    with torch.inference_mode():
        probabilities = torch.softmax(model(batch).float(), dim=1)[0].cpu()
    class_names = checkpoint["class_names"]
    for name, probability in sorted(zip(class_names, probabilities.tolist()), key=lambda p: -p[1]):
        print(f"  {name:<20} {probability:.1%}")
    best = int(probabilities.argmax())
    label = f"{class_names[best]}  {probabilities[best]:.1%}"
    print(f"{image_path}: {label}")
    saved = os.path.splitext(os.path.basename(image_path))[0] + ".prediction.png"
    plot_prediction(image, f"{label}  ({os.path.basename(path)})", saved, args.show)
    print(f"Saved {saved}")


def named_paths(paths, what):
    """[(name, path)] of the models given (default: those of COMPARED that exist here)."""
    paths = paths or [path for _, path in COMPARED if os.path.exists(path)]
    if not paths:
        raise UserError(f"no {what}: none of " + ", ".join(p for _, p in COMPARED)
                        + " exists here")
    names = {path: name for name, path in COMPARED}
    return [(names.get(path, os.path.basename(path)), path) for path in paths]


def compare_models(args, device):
    models = [(name, path, *load(path, args, device))
              for name, path in named_paths(args.compare, "checkpoint to compare")]
    rows = compare(models, data=args.data, device=device,
                   timing=TimingPlan.from_args(args),
                   batch_size=args.batch_size, workers=args.workers, verbose=args.verbose)
    print_comparison(rows)
    figure = save_comparison(rows, args.report, args.show)
    print(f"Saved {args.report}, {figure} and a confusion matrix beside each checkpoint")
    return rows


def profile_models(args):
    named = named_paths(args.profile, "model to profile")
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: --profile runs on the CPU (--device cpu)")
    cpu = torch.device("cpu")
    models = [(name, path, *load_model(path, cpu)) for name, path in named]
    print("Measuring this machine's peak: square matrix products of "
          f"{' and '.join(map(str, GEMM_SIZES))} ...", flush=True)
    peak = machine_peak()
    print(f"CPU: {describe_cpu()}, {torch.get_num_threads()} threads; peak "
          f"{peak['fp32']:.1f} GMAC/s fp32 (torch.matmul), {peak['int8']:.1f} GMAC/s int8 "
          "(onnxruntime MatMulInteger, u8 x s8)", flush=True)
    profiles = [profile_model(name, path, checkpoint, model, batch, verbose=args.verbose)
                for batch in (1, THROUGHPUT_BATCH) for name, path, checkpoint, model in models]
    for profile in profiles:
        print_profile(profile, peak["int8" if profile.precision == "int8" else "fp32"])
    explain_profiles(profiles, peak)
    write_json({"cpu": describe_cpu(), "threads": torch.get_num_threads(), "peak_gmacs": peak,
                "profiles": [dataclasses.asdict(profile) for profile in profiles]},
               "profile.json")
    plot_profiles(profiles, "profile.png", args.show)
    print("\nSaved profile.json and profile.png")


def main(args):
    if args.profile is not None:
        profile_models(args)
        return
    device = resolve_device(args.device)
    if args.compare is not None:
        check_writable(args.report, "--report")
        compare_models(args, device)
        return
    weights = args.weights or WEIGHTS[prune_test or args.pruned]
    if args.image:
        classify(weights, args.image, args, device)
    else:
        test_accuracy(weights, args, device)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
