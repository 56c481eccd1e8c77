"""Stage 5: measure a model -- its accuracy, one picture's prediction, or dense vs pruned.

Reads  vgg16Net.pth (prune_test = False) or finetuned_vgg16_net.pth (prune_test = True,
       or --pruned), or --weights PATH: a checkpoint, a bare VGG state dict (like the
       original demo's vgg16Net.pth) or an .onnx file from export.py (run in
       onnxruntime); DATA/val/<class>/ for accuracy
Writes <weights>.confusion.png            (accuracy mode)
       <image name>.prediction.png        (--image: the picture with its predicted class)
       compare.json, compare.png, <weights>.confusion.png for each model   (--compare)

    python test.py                         # accuracy of vgg16Net.pth on dataset/val
    python test.py --pruned                # ... of finetuned_vgg16_net.pth
    python test.py --image cat.jpg         # classify one picture
    python test.py --compare               # dense vs pruned vs distilled (vs int8, once
                                           # export.py ran), measured side by side
"""
import os

import torch

import deploy
import model as vgg
from cpu import cpu_class, saturates
from checkpoints import (check_made_for, file_sha256, load_checkpoint, model_from_checkpoint,
                         output_path, write_json)
from cli import (UserError, add_data_args, add_timing_args, make_parser, pyplot, resolve_device,
                 run_cli)
from data import eval_transform, find_classes, load_rgb, make_loader, val_set
from measure import count_flops, evaluate, interleaved_seconds, synchronizer

prune_test = False  # False: test the dense vgg16Net.pth; True: the distilled pruned model

WEIGHTS = {False: "vgg16Net.pth", True: "finetuned_vgg16_net.pth"}
# --compare times until each model's median is known this well (sweep.py too)
PRECISION = 0.02
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
    add_timing_args(parser, PRECISION)
    parser.add_argument("--verbose", action="store_true", help="show NNI's warnings and logs")
    return parser


def load_model(path, args, device):
    """(checkpoint or an .onnx file's description, model ready to run on `device`)."""
    if path.endswith(".onnx"):
        # onnxruntime on the CPU unless --device names CUDA: requirements.txt installs the
        # CPU build of onnxruntime, so --device auto's CUDA is not taken for granted
        onnx_device = device if args.device != "auto" else torch.device("cpu")
        checkpoint, model = deploy.load_onnx(path, onnx_device)
        if onnx_device.type == "cpu":
            warn_if_quantised_for_another_cpu(path, checkpoint)
    else:
        checkpoint = load_checkpoint(path, image_size=args.image_size)
        model = model_from_checkpoint(checkpoint, path).to(device).eval()
    check_made_for(checkpoint, path, "--image-size", image_size=args.image_size)
    return checkpoint, model


def warn_if_quantised_for_another_cpu(path, description):
    """An int8 file made for another CPU class than this one: say so, and whether its
    accuracy may suffer here (8-bit weights where u8 x s8 products saturate)."""
    if description["precision"] != "int8":
        return
    # (files written before export.py recorded it: 8-bit weights, for no CPU in particular)
    quantization = description.get("quantization", {"cpu": None, "reduce_range": False})
    made_for, here = quantization["cpu"], cpu_class()
    if made_for == here:
        return
    line = (f"note: {path} was quantised for {made_for} CPUs" if made_for else
            f"note: {path} records no CPU class (exported by an earlier export.py)")
    line += f", this one is {here}"
    if saturates(here) and not quantization.get("reduce_range"):
        line += ("; its 8-bit weights can saturate here (u8 x s8 products summed in int16), "
                 "so its accuracy may be below what export.py measured: export it again here, "
                 f"or with --int8-for {here}")
    print(line, flush=True)


def val_loader(args, checkpoint, path, device):
    """DATA/val as the checkpoint sees it, refused if its classes are not the checkpoint's."""
    folder = os.path.join(args.data, "val")
    check_made_for(checkpoint, path, folder, class_names=find_classes(folder))
    dataset = val_set(args.data, checkpoint["image_size"], checkpoint["class_names"],
                      normalization=checkpoint["normalization"])
    return make_loader(dataset, args.batch_size, args.workers, device, sampler=None)


def plot_confusion(metrics, class_names, path, title, show):
    plt = pyplot(show)
    size = max(4, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    confusion = metrics["confusion"]
    axis.imshow(confusion, cmap="Blues")
    darkest = max(max(counts) for counts in confusion)
    for row, counts in enumerate(confusion):
        for column, count in enumerate(counts):
            axis.text(column, row, count, ha="center", va="center",
                      color="white" if count > darkest / 2 else "black")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set(xlabel="predicted", ylabel="true", title=f"{title}: {metrics['accuracy']:.1%}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.show() if show else plt.close(figure)


def test_accuracy(path, args, device):
    checkpoint, model = load_model(path, args, device)
    class_names = checkpoint["class_names"]
    metrics = evaluate(model, val_loader(args, checkpoint, path, device), device,
                       len(class_names), progress="evaluating")
    print(f"{path}: accuracy {metrics['accuracy']:.2%} on {metrics['count']} images of "
          f"{os.path.join(args.data, 'val')}")
    for name, accuracy in zip(class_names, metrics["per_class_accuracy"]):
        print(f"  {name:<20} {accuracy:.2%}")
    figure = output_path(path, "confusion.png")
    plot_confusion(metrics, class_names, figure, os.path.basename(path), args.show)
    print(f"Confusion matrix: {figure}")


def classify(path, image_path, args, device):
    checkpoint, model = load_model(path, args, device)
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
    plt = pyplot(args.show)
    figure, axis = plt.subplots(figsize=(5, 5.4))
    axis.imshow(image)
    axis.set_title(f"{label}  ({os.path.basename(path)})")
    axis.axis("off")
    saved = os.path.splitext(os.path.basename(image_path))[0] + ".prediction.png"
    figure.savefig(saved, dpi=100, bbox_inches="tight")
    plt.show() if args.show else plt.close(figure)
    print(f"Saved {saved}")


def measure(name, path, checkpoint, model, args, device):
    """Accuracy, size, FLOPs of one checkpoint's model (time_models adds its speed)."""
    image_size = checkpoint["image_size"]
    metrics = evaluate(model, val_loader(args, checkpoint, path, device), device,
                       len(checkpoint["class_names"]), progress=f"evaluating {name}")
    onnx = path.endswith(".onnx")
    # an .onnx file's FLOPs and parameters are those of the widths it describes
    counted = vgg.from_architecture(checkpoint["architecture"]) if onnx else model.cpu()
    flops, params = count_flops(counted, image_size, args.verbose)
    if not onnx:  # channels-last: measured faster on CPU for dense and pruned VGG16 alike
        model.to(device, memory_format=torch.channels_last)  # (tools/benchmark.py times both)
    plot_confusion(metrics, checkpoint["class_names"], output_path(path, "confusion.png"),
                   name, args.show)
    return {"name": name, "path": path, "kind": checkpoint["kind"],
            "arch": checkpoint["architecture"]["arch"],
            "accuracy": metrics["accuracy"], "per_class_accuracy": metrics["per_class_accuracy"],
            "params": params, "flops": flops, "file_bytes": os.path.getsize(path),
            "device": str(device), "threads": torch.get_num_threads(),
            "runtime": "onnxruntime" if onnx else "torch",
            "precision": checkpoint.get("precision", "fp32"),
            "memory_format": None if onnx else "channels_last",
            "image_size": image_size, "val_images": metrics["count"]}


def time_models(rows, models, args, device):
    """Add each model's batch-1 latency and batch-32 throughput to its row, all models
    timed interleaved on the same random inputs (one set per image size)."""
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {}
    for row in rows:
        size = row["image_size"]
        if size not in inputs:
            inputs[size] = (torch.randn(1, 3, size, size, generator=generator),
                            torch.randn(32, 3, size, size, generator=generator))
    sync = synchronizer(device)
    for batch_index, (field, spread_field) in enumerate([("latency_ms", "latency_iqr_ms"),
                                                          ("batch_ms", "batch_iqr_ms")]):
        runs = []
        for row, model in zip(rows, models):
            batch = inputs[row["image_size"]][batch_index].to(device)
            if row["runtime"] == "torch":
                batch = batch.to(memory_format=torch.channels_last)
            runs.append(lambda model=model, batch=batch: model(batch))
        with torch.inference_mode():
            timings = interleaved_seconds(runs, sync, args.warmup, args.repeats,
                                          args.max_repeats, PRECISION)
        for row, timing in zip(rows, timings):
            row.update({field: timing.median * 1000, spread_field: timing.iqr * 1000,
                        field.replace("_ms", "_runs"): timing.runs,
                        field.replace("_ms", "_uncertainty"): timing.uncertainty})
    for row in rows:
        row.update(batch_size=32, throughput_ips=32 / row["batch_ms"] * 1000,
                   timing_uncertainty=max(row["latency_uncertainty"], row["batch_uncertainty"]))


def compare(args, device):
    paths = args.compare or [path for _, path in COMPARED if os.path.exists(path)]
    if not paths:
        raise UserError("no checkpoint to compare: none of "
                        + ", ".join(p for _, p in COMPARED) + " exists here")
    names = {path: name for name, path in COMPARED}
    rows, models = [], []
    for path in paths:
        checkpoint, model = load_model(path, args, device)
        warn_if_exported_earlier(path, checkpoint)
        rows.append(measure(names.get(path, os.path.basename(path)), path, checkpoint, model,
                            args, device))
        models.append(model)  # all in memory: they are timed interleaved (dense VGG16: 0.5 GB)
        print(f"measured {path}", flush=True)
    print(f"timing {len(models)} models interleaved ...", flush=True)
    time_models(rows, models, args, device)
    print_table(rows)
    write_json(rows, args.report)
    figure = os.path.splitext(args.report)[0] + ".png"
    plot_comparison(rows, figure, args.show)
    print(f"Saved {args.report}, {figure} and a confusion matrix beside each checkpoint")
    return rows


def warn_if_exported_earlier(path, description):
    """An .onnx file whose checkpoint beside it has changed since: say so (run export.py)."""
    if not path.endswith(".onnx"):
        return
    source = os.path.join(os.path.dirname(path), description["source"])
    if os.path.isfile(source) and file_sha256(source) != description["source_sha256"]:
        print(f"note: {path} was exported from an earlier {source}; run export.py again to "
              "measure the current one", flush=True)


def print_table(rows):
    base = rows[0]
    width = max(10, *(len(row["name"]) for row in rows))  # the model column fits every name
    header = (f"{'model':<{width}} {'val acc':>8} {'params':>14} {'FLOPs':>14} {'file size':>14} "
              f"{'latency b=1 (IQR)':>24} {'throughput b=32':>18}")
    print(f"\nMeasured on {base['device']} with {base['threads']} threads (PyTorch in "
          "channels-last, .onnx files in onnxruntime), timed interleaved, median and "
          f"interquartile range; ratios against {base['name']}\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(f"{row['name']:<{width}} {row['accuracy']:>8.1%} "
              f"{row['params'] / 1e6:>6.1f}M {row['params'] / base['params']:>5.2f}x "
              f"{row['flops'] / 1e9:>6.2f}G {row['flops'] / base['flops']:>5.2f}x "
              f"{row['file_bytes'] / 2**20:>6.1f}MB {row['file_bytes'] / base['file_bytes']:>5.2f}x "
              f"{row['latency_ms']:>7.1f}ms ({row['latency_iqr_ms']:>5.2f}) "
              f"{base['latency_ms'] / row['latency_ms']:>5.2f}x↑ "
              f"{row['throughput_ips']:>7.1f}img/s "
              f"{row['throughput_ips'] / base['throughput_ips']:>5.2f}x↑")
    print("(x: model / first model; x↑: speed-up over the first model)")
    loose = [row["name"] for row in rows if row["timing_uncertainty"] > PRECISION]
    if loose:
        print(f"The medians of {', '.join(loose)} are known only to more than {PRECISION:.0%} "
              "(IQR / sqrt(runs)) after --max-repeats runs: the machine was busy; compare them "
              "with care, or time them again")
    print()


def plot_comparison(rows, path, show):
    plt = pyplot(show)
    names = [row["name"] for row in rows]
    panels = [("val accuracy (%)", [100 * r["accuracy"] for r in rows]),
              ("parameters (M)", [r["params"] / 1e6 for r in rows]),
              ("file size (MB)", [r["file_bytes"] / 2**20 for r in rows]),
              ("latency, batch 1 (ms)", [r["latency_ms"] for r in rows]),
              ("throughput, batch 32 (img/s)", [r["throughput_ips"] for r in rows])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
        axis.bar_label(bars, fmt=lambda value: f"{value:.3g}" if value < 1000 else f"{value:.0f}")
        axis.set_title(title)
    figure.suptitle(f"Measured on {rows[0]['device']}, {rows[0]['threads']} threads, "
                    f"{rows[0]['image_size']} px")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.show() if show else plt.close(figure)


def main(args):
    device = resolve_device(args.device)
    if args.compare is not None:
        compare(args, device)
        return
    weights = args.weights or WEIGHTS[prune_test or args.pruned]
    if args.image:
        classify(weights, args.image, args, device)
    else:
        test_accuracy(weights, args, device)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
