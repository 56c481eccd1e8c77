"""Run the whole pipeline, as a newcomer would type it: on synthetic pictures, or on yours.

Without --photos: draws cat and dog pictures into demo/demo_animals/ (never into your
animals/), then runs the six stages from inside demo/, so their outputs (dataset/,
vgg16Net.pth, pruned_vgg16_net.pth, finetuned_vgg16_net.pth, its .onnx and .int8.onnx,
figures) land in demo/. The settings are chosen to finish in about 10 minutes on a
2-core CPU (VGG16 with batch norm at 48 px); see README.md for what they measured.

With --photos DIR (DIR/<class>/*.jpg, only read): a recipe for photographs (the settings
below: a starting point whose choices have not yet each been measured against the
alternatives), in --workdir: split with a held-out test part, train the dense teacher,
sweep l1 sparsities with distillation and pick the fastest int8 model within --max-drop
points of the dense one, then compare the dense model, the pick and its int8 file on the
test split. Before it starts it says what it will run and about how long that takes on
this machine (from a few timed training steps). Ctrl-C stops it with every finished stage
kept and the one running saved: run the same command again to continue.

Each command is printed before it runs.

    python tools/demo.py                           # the synthetic demo, ~10 min
    python tools/demo.py --photos ~/flowers        # your photos, with the photo recipe
    python tools/demo.py --photos ~/flowers --plan # only say what it would do, and how long
"""
import json
import os
import shlex
import subprocess
import sys
import time

from compress.cli import UserError, make_parser, points, run_cli
from compress.data.pictures import find_classes, is_image_name
from compress.machine.cpu import describe_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join(REPO, "demo")

# --- the synthetic demo ------------------------------------------------------------------
PER_CLASS = 400        # pictures per class (70% train, 30% validation)
PICTURE_SIZE = 64      # px of the generated JPEGs
IMAGE_SIZE = 48        # px the network sees
# VGG16 from scratch on a few hundred pictures: batch norm, a lower learning rate
# than the default 1e-4 (which oscillates here), small batches for more steps and
# milder crops than torchvision's 8% minimum.
COMMON = ["--batch-size", "16", "--lr", "3e-5", "--crop-scale", "0.5"]
TRAIN = ["--image-size", str(IMAGE_SIZE), "--batch-norm", "--epochs", "8", *COMMON]
DISTILL = ["--epochs", "6", *COMMON]

STAGES = [
    ("tools/make_demo_data.py", ["--dest", "demo_animals", "--per-class", str(PER_CLASS),
                                 "--size", str(PICTURE_SIZE)]),
    ("split_dataset.py", ["--source", "demo_animals"]),
    ("train.py", TRAIN),
    ("pruner.py", []),
    ("knowledge_distillation.py", DISTILL),
    ("test.py", ["--pruned"]),
    ("test.py", ["--image", lambda: first_picture("dataset/val/dog")]),
    ("export.py", []),
    ("test.py", ["--compare"]),
]

# --- your photos: a recipe for photographs (not yet an ablation-tested one) --------------
PHOTO_SIZE = 64
SPLIT = {"ratio": 0.6, "test_ratio": 0.2}
TEACHER_EPOCHS = 25
TEACHER = ["--image-size", str(PHOTO_SIZE), "--batch-norm", "--classifier-width", "512",
           "--epochs", str(TEACHER_EPOCHS), "--optimizer", "adamw", "--lr", "5e-4",
           "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-epochs", "2",
           "--label-smoothing", "0.1", "--crop-scale", "0.25", "--cache"]
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
KD_EPOCHS = 8
SWEEP = ["--methods", "l1", "--sparsities", *map(str, SPARSITIES), "--kd-epochs", str(KD_EPOCHS),
         "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--schedule",
         "cosine", "--warmup-epochs", "1", "--crop-scale", "0.25", "--cache",
         "--temperature", "4", "--alpha", "0.9", "--target", "int8"]


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--photos", metavar="DIR",
                        help="your photos, one sub-folder per class (only read); without it, "
                             "the synthetic demo")
    parser.add_argument("--workdir", default="photos_run",
                        help="--photos: where every stage writes (the split, the teacher, the "
                             "sweep); run the same command again to continue in it")
    parser.add_argument("--max-drop", type=points, default=1.0, metavar="POINTS",
                        help="--photos: the fastest int8 model at most this many accuracy "
                             "points below the dense one is picked")
    parser.add_argument("--plan", action="store_true",
                        help="--photos: say what would run and about how long it takes here, "
                             "then stop")
    return parser


def first_picture(folder):
    return os.path.join(folder, sorted(os.listdir(os.path.join(WORKDIR, folder)))[0])


def run_stage(script, args, cwd):
    """Run one stage as a user types it; its exit status (130 after Ctrl-C)."""
    print(f"\n$ python {script} {shlex.join(args)}", flush=True)
    try:
        return subprocess.run([sys.executable, os.path.join(REPO, script), *args],
                              cwd=cwd).returncode
    except KeyboardInterrupt:  # (the stage got the same Ctrl-C, and saved what it could)
        return 130


def synthetic_demo():
    os.makedirs(WORKDIR, exist_ok=True)
    started = time.perf_counter()
    for script, args in STAGES:
        args = [arg() if callable(arg) else arg for arg in args]
        status = run_stage(script, args, WORKDIR)
        if status != 0:
            print(f"\ndemo: {script} failed (exit status {status}); stopped.", file=sys.stderr)
            return status
    minutes = (time.perf_counter() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Outputs are in {os.path.relpath(WORKDIR)}/: "
          "compare.png, *.history.png, pruned_vgg16_net.channels.png, *.confusion.png, "
          "<picture>.prediction.png, finetuned_vgg16_net.onnx and .int8.onnx")
    return 0


def count_photos(photos):
    """{class: usable-looking files} of the user's folder (by name; the split checks them)."""
    if not os.path.isdir(photos):
        raise UserError(f"--photos {photos}: folder not found (expected {photos}/<class>/"
                        "<images>, one sub-folder per class)")
    counts = {name: sum(is_image_name(f) for f in os.listdir(os.path.join(photos, name)))
              for name in find_classes(photos)}
    if len(counts) < 2:
        raise UserError(f"--photos {photos}: needs at least two class sub-folders, found "
                        f"{len(counts)}")
    return counts


def training_speed(widths_share, steps=3):
    """Training pictures per second of VGG16 with batch norm at PHOTO_SIZE px, batch 32, its
    convolutions `widths_share` of the dense widths (1: the teacher), as train.py trains."""
    import torch

    import model as vgg

    torch.manual_seed(0)
    features = [w if w == "M" else max(1, round(w * widths_share))
                for w in vgg.CONV_WIDTHS["vgg16"]]
    width = max(1, round(512 * widths_share))
    network = vgg.from_architecture({"arch": "vgg16", "batch_norm": True, "num_classes": 5,
                                     "features": features, "classifier": [width, width]})
    network = network.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=True)
    images = torch.randn(32, 3, PHOTO_SIZE, PHOTO_SIZE).to(memory_format=torch.channels_last)
    labels = torch.zeros(32, dtype=torch.long)
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(images), labels).backward()
        optimizer.step()
        timings.append(time.perf_counter() - started)
    return 32 / min(timings[1:])


def photo_plan(args):
    """[(stage, script, args, minutes estimated)] for --photos, and what they write."""
    counts = count_photos(args.photos)
    total = sum(counts.values())
    train = round(total * SPLIT["ratio"])
    print(f"{args.photos}: {total} pictures of {len(counts)} classes ("
          + ", ".join(f"{name} {count}" for name, count in counts.items()) + ")")
    print("Timing a few training steps on this machine to estimate the run ...", flush=True)
    teacher_speed = training_speed(1.0)
    teacher_minutes = TEACHER_EPOCHS * (train / teacher_speed + 0.15 * total / teacher_speed) / 60
    # a student trains in its share of the time, and the teacher answers each training
    # picture of each epoch once (a forward pass: about a third of a training step)
    student_minutes = sum(KD_EPOCHS * train / training_speed(1 - s, steps=2) / 60
                          for s in SPARSITIES) + KD_EPOCHS * train / teacher_speed / 3 / 60
    split = ["--source", os.path.abspath(args.photos), "--dest", "dataset",
             "--ratio", str(SPLIT["ratio"]), "--test-ratio", str(SPLIT["test_ratio"])]
    return [("split", "split_dataset.py", split, 0.1 * total / 1000),
            ("train the dense teacher", "train.py", TEACHER, teacher_minutes),
            ("sweep and pick", "sweep.py", [*SWEEP, "--max-drop", f"{args.max_drop:g}"],
             student_minutes + 2 * len(SPARSITIES) + 3),
            ("compare dense, pick and its int8 file on the test split", "test.py",
             ["--compare", "vgg16Net.pth", "PICK.pth", "PICK.int8.onnx"], 2)], teacher_speed


def split_done(workdir, args):
    """Whether dataset/ in `workdir` is the split of these photos with these ratios."""
    try:
        with open(os.path.join(workdir, "dataset", ".split_dataset.json")) as file:
            marker = json.load(file)
    except (OSError, ValueError):
        return False
    return (marker.get("source") == os.path.abspath(args.photos)
            and marker.get("ratio") == SPLIT["ratio"]
            and marker.get("test_ratio") == SPLIT["test_ratio"])


def training_done(workdir):
    """Whether train.py ran all its epochs in `workdir` (no Ctrl-C state left)."""
    try:
        with open(os.path.join(workdir, "vgg16Net.history.json")) as file:
            epochs = len(json.load(file))
    except (OSError, ValueError):
        return False
    return epochs >= TEACHER_EPOCHS and not os.path.exists(
        os.path.join(workdir, "vgg16Net.state.pth"))


def picked(workdir):
    """The sweep's pick (its checkpoint's path in `workdir`), or None."""
    with open(os.path.join(workdir, "sweep", "sweep.json")) as file:
        rows = json.load(file)
    chosen = [row for row in rows if row.get("picked")]
    return os.path.relpath(chosen[0]["path"], workdir) if chosen else None


def photo_demo(args):
    plan, speed = photo_plan(args)
    workdir = os.path.abspath(args.workdir)
    print(f"\nOn this machine ({describe_cpu()}; VGG16 trains at {speed:.1f} pictures/s here) "
          f"it will run, in {args.workdir}/:")
    for number, (stage, script, stage_args, minutes) in enumerate(plan, 1):
        print(f"  {number}. {stage}: about {minutes:.0f} min\n       python {script} "
              f"{shlex.join(stage_args)}")
    print(f"In all about {sum(m for *_, m in plan) / 60:.1f} hours; Ctrl-C keeps what is done "
          "and the same command continues.", flush=True)
    if args.plan:
        return 0
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    for stage, script, stage_args, _ in plan:
        if script == "split_dataset.py" and split_done(workdir, args):
            print(f"\n{stage}: done before, kept")
            continue
        if script == "train.py":
            if training_done(workdir):
                print(f"\n{stage}: done before, kept (vgg16Net.pth)")
                continue
            state = os.path.join(workdir, "vgg16Net.state.pth")
            stage_args = [*stage_args, "--resume", state] if os.path.exists(state) else stage_args
        if script == "test.py":
            pick = picked(workdir)
            if pick is None:
                print(f"\nNo model is within {args.max_drop:g} points of the dense one: see "
                      f"{args.workdir}/sweep/sweep.png, or allow more with --max-drop")
                return 1
            stage_args = ["--compare", "vgg16Net.pth", pick, pick[:-len(".pth")] + ".int8.onnx",
                          "--data", "dataset"]
        status = run_stage(script, stage_args, workdir)
        if status == 130:
            print("\ndemo: interrupted; what is done is kept: run the same command again to "
                  "continue.", file=sys.stderr)
            return 130
        if status != 0:
            print(f"\ndemo: {script} failed (exit status {status}); stopped.", file=sys.stderr)
            return status
    print(f"\nDone in {(time.perf_counter() - started) / 60:.0f} min. In {args.workdir}/: "
          "compare.json/.png (the test split), sweep/sweep.json/.png, the pick's .onnx and "
          ".int8.onnx files beside its checkpoint in sweep/.")
    return 0


def main(args):
    if args.photos is None:
        for flag, given in (("--plan", args.plan), ("--workdir", args.workdir != "photos_run")):
            if given:
                raise UserError(f"{flag}: only with --photos")
        status = synthetic_demo()
    else:
        status = photo_demo(args)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
