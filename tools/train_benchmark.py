"""Training throughput: train.py's loop against a plain loop like the original demo's.

Both train the same VGG on the same pictures with the same batch size, on the
same device and threads, one after the other in this one run, and the ratio
of their training images per second is printed (validation is not counted):

- plain loop: torchvision's ImageFolder, a default DataLoader (shuffled, with the
  original's min(cores, batch, 8) workers), plain Adam, fp32, PyTorch's default
  memory format: the loop of the original demo's train.py.
- train.py: run as a user runs it, its own training loop (training.fit), so fused Adam,
  channels-last, and on CUDA pinned memory and cudnn.benchmark; --amp and
  --cache are passed on to it.
- --nproc N adds train.py under torchrun in N processes with the same global
  batch (--batch-size / N each), against train.py in one process.

The first epoch warms up (workers start, cudnn picks its kernels), so the rate
compared is that of the later epochs. --cache decodes every picture before the
first epoch; that time is not counted. Without --data, photo-sized synthetic
pictures (--photo-size px, like the Dogs vs. Cats photos) are drawn into a
temporary folder.

    python tools/train_benchmark.py                          # 224 px, batch 16, 3 epochs
    python tools/train_benchmark.py --amp --cache --per-class 1000   # on a GPU
    python tools/train_benchmark.py --nproc 2 --device cpu   # also 2 processes vs 1
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from compress.cli import (UserError, image_size_type, int_within, make_parser, non_negative_int,
                          positive_int, resolve_device, run_cli)
from compress.data.images import ImageFolder, default_workers, train_transform, val_set
from make_demo_data import generate  # (tools/ is on the path: this script's folder)
from model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data", help="a split dataset (DATA/train, DATA/val) to train on "
                                       "(default: synthetic pictures in a temporary folder)")
    parser.add_argument("--per-class", type=positive_int, default=32,
                        help="synthetic training pictures per class (two classes)")
    parser.add_argument("--photo-size", type=image_size_type, default=384,
                        help="side of the synthetic pictures in pixels")
    parser.add_argument("--image-size", type=image_size_type, default=224,
                        help="training input size in pixels")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="images per step (the global batch under --nproc)")
    parser.add_argument("--epochs", type=int_within(2, "at least 2 (the first warms up)"),
                        default=3,
                        help="epochs per loop; the first is the warm-up")
    parser.add_argument("--batch-norm", action="store_true", help="VGG16 with batch norm")
    parser.add_argument("--classifier-width", type=positive_int, default=4096,
                        help="units of VGG16's two hidden Linear layers, in both loops (as "
                             "train.py --classifier-width)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=non_negative_int,
                        help="data-loading worker processes, for both loops (default: each "
                             "loop's own: the original's min(cores, batch, 8), train.py's)")
    parser.add_argument("--amp", action="store_true", help="pass --amp to train.py (CUDA)")
    parser.add_argument("--cache", action="store_true", help="pass --cache to train.py")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="also run train.py under torchrun with this many processes")
    return parser


def steady_rate(rates):
    """Images per second over the epochs after the first (all epochs are the same size)."""
    later = rates[1:]
    return len(later) / sum(1 / rate for rate in later)


def plain_loop_rates(args, device):
    """The original demo's training loop, timed: (images per second of each epoch, images)."""
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"),
                                               train_transform(args.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=plain_workers(args))
    torch.manual_seed(0)
    net = build_model("vgg16", len(dataset.classes), args.batch_norm,
                      args.classifier_width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    rates = []
    for epoch in range(args.epochs):
        net.train()
        started, count, running_loss = time.perf_counter(), 0, 0.0
        for images, labels in tqdm(loader, desc=f"plain loop epoch {epoch + 1}/{args.epochs}",
                                   leave=False, disable=None):
            optimizer.zero_grad()
            outputs = net(images.to(device))
            loss = F.cross_entropy(outputs, labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            count += labels.numel()
        rates.append(count / (time.perf_counter() - started))
    return rates, len(dataset)


def plain_workers(args):
    if args.workers is not None:
        return args.workers
    return min(os.cpu_count() or 1, args.batch_size if args.batch_size > 1 else 0, 8)


def train_py_argv(args, folder, batch_size):
    argv = ["--data", args.data, "--image-size", args.image_size, "--batch-size", batch_size,
            "--epochs", args.epochs, "--device", args.device,
            "--classifier-width", args.classifier_width,
            "--output", os.path.join(folder, "vgg16Net.pth"),
            "--class-index", os.path.join(folder, "class_indices.json")]
    if args.workers is not None:
        argv += ["--workers", args.workers]
    argv += [flag for flag, on in (("--amp", args.amp), ("--cache", args.cache),
                                   ("--batch-norm", args.batch_norm)) if on]
    return [str(a) for a in argv]


def history_rates(folder):
    with open(os.path.join(folder, "vgg16Net.history.json")) as file:
        return [record["images_per_second"] for record in json.load(file)]


def train_py_rates(args, folder, processes=1):
    """train.py's own rates: run in a process of its own, or launched by torchrun in
    `processes` processes with the global batch kept (its epoch lines silenced; its bars
    and errors still shown). The rates are those its history records: training alone,
    timed inside each epoch, so the interpreter's start is not counted."""
    script = os.path.join(REPO, "train.py")
    launcher = [sys.executable, script] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", script]
    command = [*launcher, *train_py_argv(args, folder, args.batch_size // processes)]
    env = dict(os.environ)
    if processes > 1:  # the cores shared out, as train.py does (and torchrun stays quiet)
        print(f"Running train.py in {processes} processes (torchrun) ...", flush=True)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    try:
        returncode = child.wait()
    except KeyboardInterrupt:  # the child got it too and stops: let it finish
        child.wait()
        raise
    if returncode != 0:
        how = "under torchrun " if processes > 1 else ""
        raise UserError(f"train.py {how}failed with status {returncode} (its errors are above)")
    return history_rates(folder)


def main(args):
    device = resolve_device(args.device)
    if args.batch_size % args.nproc:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over "
                        f"--nproc {args.nproc} processes")
    if args.data is not None:  # a one-line error now, not after minutes of the first loop
        class_names = ImageFolder(os.path.join(args.data, "train"), transform=None).class_names
        val_set(args.data, args.image_size, class_names)
    with tempfile.TemporaryDirectory(prefix="train_benchmark.") as scratch:
        if args.data is None:
            args.data = os.path.join(scratch, "data")
            print(f"Drawing {2 * args.per_class} synthetic {args.photo_size} px pictures ...",
                  flush=True)
            generate(os.path.join(args.data, "train"), args.per_class, args.photo_size, seed=0)
            generate(os.path.join(args.data, "val"), 4, args.photo_size, seed=1)
        print(f"Timing the plain loop ({args.epochs} epochs) ...", flush=True)
        plain_rates, images = plain_loop_rates(args, device)
        rows = [(f"plain loop (original's), {plain_workers(args)} workers", plain_rates)]
        print(f"Timing train.py ({args.epochs} epochs) ...", flush=True)
        os.makedirs(os.path.join(scratch, "one"))
        workers = default_workers(device) if args.workers is None else args.workers
        rows.append(("train.py" + "".join(f" --{flag}" for flag in ("amp", "cache")
                                          if getattr(args, flag)) + f", {workers} workers",
                     train_py_rates(args, os.path.join(scratch, "one"))))
        if args.nproc > 1:
            os.makedirs(os.path.join(scratch, "many"))
            rows.append((f"  same, torchrun {args.nproc} processes",
                         train_py_rates(args, os.path.join(scratch, "many"), args.nproc)))

    head = "" if args.classifier_width == 4096 else f", classifier width {args.classifier_width}"
    print(f"\nTraining throughput: VGG16{' with batch norm' if args.batch_norm else ''}{head} at "
          f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs of {images} "
          f"pictures, on {device} with {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'':<40}{'epoch 1':>12}{'later epochs':>14}   ratio")
    plain, single = steady_rate(rows[0][1]), steady_rate(rows[1][1])
    for index, (label, rates) in enumerate(rows):
        ratio = (f"{steady_rate(rates) / plain:.2f}x the plain loop" if index < 2 else
                 f"{steady_rate(rates) / single:.2f}x train.py in one process")
        print(f"{label:<40}{rates[0]:>8.2f}im/s{steady_rate(rates):>10.2f}im/s   {ratio}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
