"""Run the whole pipeline, as a newcomer would type it: on synthetic pictures, or on yours.

Without --photos: draws cat and dog pictures into demo/demo_animals/ (never into your
animals/), then runs the six stages from inside demo/, so their outputs (dataset/,
vgg16Net.pth, pruned_vgg16_net.pth, finetuned_vgg16_net.pth, its .onnx and .int8.onnx,
figures) land in demo/. The settings are chosen to finish in about 10 minutes on a
2-core CPU (VGG16 with batch norm at 48 px); docs/results.md says what they measured.

With --photos DIR (DIR/<class>/*.jpg, only read): the photo recipe (the settings below;
docs/photos.md says what each choice measured), in --workdir: split with a held-out test
part (copies of a photo kept in one part), train the dense teacher, sweep l1 sparsities
with distillation (successive halving: every sparsity briefly, the promising ones for
longer; the teacher answers the mixed pictures the students see) and decide on val:
the fastest int8 model within --max-drop points of the dense one ships; if none is, the
run still ends with a file, named .over-budget. Then the dense model, the student and
the shipped file are compared on the test split, and RESULT.md (with result.png) says
what went in, what came out, how long each stage took and how to run the file. Before
it starts it says what it will run and about how long that takes on this machine (from
a few timed training steps). Ctrl-C stops it with every finished stage kept and the one
running saved: run the same command again to continue; run it again with another
--max-drop and the finished sweep decides again in seconds.

Each command is printed before it runs.

    python tools/demo.py                           # the synthetic demo, ~10 min
    python tools/demo.py --photos ~/flowers        # your photos, with the photo recipe
    python tools/demo.py --photos ~/flowers --plan # only say what it would do, and how long
    python tools/demo.py --photos ~/flowers --max-drop 2   # afterwards: another budget
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

from compress.cli import UserError, add_shared_flags, make_parser, points, run_cli
from compress.data.pictures import find_classes, is_image_name
from compress.machine.cpu import describe_cpu, native_bf16

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

# --- your photos: the photo recipe (docs/photos.md: what each choice measured) ------------
PHOTO_SIZE = 64
SPLIT = {"ratio": 0.6, "test_ratio": 0.2}
TEACHER_EPOCHS = 20
TEACHER = ["--image-size", str(PHOTO_SIZE), "--batch-norm", "--classifier-width", "512",
           "--epochs", str(TEACHER_EPOCHS), "--optimizer", "adamw", "--lr", "5e-4",
           "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-epochs", "2",
           "--label-smoothing", "0.1", "--crop-scale", "0.25", "--cache"]
SPARSITIES = (0.7, 0.8, 0.85, 0.9)
# successive halving: every sparsity distils for the first number of epochs, then half of
# them for the second more (those within reach of the budget, the fastest first, then the
# most accurate: compress/sweep/halving.py)
KD_STAGES = (5, 20)
MIX = "mixup"  # function matching: the teacher answers the mixed picture the student sees
SWEEP = ["--methods", "l1", "--sparsities", *map(str, SPARSITIES),
         "--kd-epochs", *map(str, KD_STAGES), "--mix", MIX,
         "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--schedule",
         "cosine", "--warmup-epochs", "1", "--crop-scale", "0.25", "--cache",
         "--temperature", "4", "--alpha", "0.9", "--target", "int8"]
COMPARE = []  # test.py --compare's flags beyond the models and the split (its timing's defaults)
# the int8 file that ships, in the work folder; where the budget was missed its name says so
SHIPPED = "{name}.int8.onnx"
OVER_BUDGET = "{name}.over-budget.int8.onnx"


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--photos", metavar="DIR",
                        help="your photos, one sub-folder per class (only read); without it, "
                             "the synthetic demo")
    parser.add_argument("--workdir", default="photos_run",
                        help="--photos: where every stage writes (the split, the teacher, the "
                             "sweep, the file shipped, RESULT.md); run the same command again "
                             "to continue in it")
    parser.add_argument("--max-drop", type=points, default=1.0, metavar="POINTS",
                        help="--photos: the budget: the fastest int8 model at most this many "
                             "accuracy points below the dense one (on val) ships; if none is, "
                             "the fastest whose interval reaches the budget (else the most "
                             "accurate) ships, its file named .over-budget. Run again with "
                             "another budget: the finished sweep decides again in seconds")
    parser.add_argument("--plan", action="store_true",
                        help="--photos: say what would run and about how long it takes here, "
                             "then stop")
    add_shared_flags(parser, "--amp", amp={"help": "--photos: train and distil under bf16 "
                                                   "autocast where the CPU computes bfloat16 "
                                                   "(AMX, AVX512-BF16; the plan says what it "
                                                   "does here), on CUDA in mixed precision"})
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


def speeds(widths_share, steps=5):
    """(training, inference) pictures per second of VGG16 with batch norm at PHOTO_SIZE px,
    batch 32, channels-last, its convolutions `widths_share` of the dense widths (1: the
    teacher), as train.py trains and the teacher answers: the median of `steps` steps after
    two untimed ones (the first builds the kernels). (On this project's 2-core KVM
    machines one step's time varies by a fifth from minute to minute: docs/photos.md.)"""
    import statistics

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

    def timed(step):
        times = []
        for _ in range(steps + 2):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return 32 / statistics.median(times[2:])

    def train_step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(images), labels).backward()
        optimizer.step()
    training = timed(train_step)
    network.eval()
    with torch.inference_mode():
        inference = timed(lambda: network(images))
    return training, inference


# What the plan adds to the timed steps, measured on the flowers photos (docs/photos.md):
# per training picture, what the loop spends beside the step (reading the cached picture,
# cropping, mixing, the stored answer): the small students' epochs ran at 150 pictures/s
# where their timed steps ran at 247; and for the sweep's end, per model (the students
# and the dense one), its int8 export with its check on val, then its accuracy and timing
# in int8 and PyTorch (about 5 minutes for the 5 models of that run)
LOADING_SECONDS = 0.003
EXPORT_MINUTES = 0.5
MEASURE_MINUTES = 0.5


def photo_plan(args):
    """[(stage, script, args, minutes estimated)] for --photos, and the teacher's training
    speed here."""
    counts = count_photos(args.photos)
    total = sum(counts.values())
    train, val = round(total * SPLIT["ratio"]), round(total * (1 - SPLIT["ratio"]
                                                             - SPLIT["test_ratio"]))
    print(f"{args.photos}: {total} pictures of {len(counts)} classes ("
          + ", ".join(f"{name} {count}" for name, count in counts.items()) + ")")
    print("Timing a few training steps on this machine to estimate the run ...", flush=True)
    teacher_train, teacher_answer = speeds(1.0)

    def epoch_minutes(training, answering):
        return (train * (1 / training + LOADING_SECONDS) + val / answering) / 60
    teacher_minutes = TEACHER_EPOCHS * epoch_minutes(teacher_train, teacher_answer)
    student_epoch = {s: epoch_minutes(*speeds(1 - s, steps=3)) for s in SPARSITIES}
    # every setting runs the first stage; which half continues is known only then, so each
    # later stage counts half of the settings at their mean cost
    mean = sum(student_epoch.values()) / len(SPARSITIES)
    first, *later = KD_STAGES
    student_minutes = (first * sum(student_epoch.values())
                       + sum(later) * math.ceil(len(SPARSITIES) / 2) * mean)
    # the teacher answers each epoch's (mixed) pictures once: every student reads them back
    answers = sum(KD_STAGES) * train / teacher_answer / 60
    measuring = (len(SPARSITIES) + 1) * (EXPORT_MINUTES + MEASURE_MINUTES)
    split = ["--source", os.path.abspath(args.photos), "--dest", "dataset",
             "--ratio", str(SPLIT["ratio"]), "--test-ratio", str(SPLIT["test_ratio"])]
    amp = ["--amp"] if args.amp else []
    return [("split", "split_dataset.py", split, 0.1 * total / 1000),
            ("train the dense teacher", "train.py", TEACHER + amp, teacher_minutes),
            ("sweep and pick", "sweep.py", [*SWEEP, *amp, "--max-drop", f"{args.max_drop:g}"],
             student_minutes + answers + measuring),
            ("compare dense, pick and the shipped file on the test split", "test.py",
             ["--compare", "vgg16Net.pth", "sweep/PICK.pth", "PICK.int8.onnx"], 2)], \
        teacher_train


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


class RunLog:
    """run.json in the work folder: each stage's minutes (added up over the runs that
    continued it), the sweep's command, and the file shipped."""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, "run.json")
        try:
            with open(self.path) as file:
                self.record = json.load(file)
        except (OSError, ValueError):
            self.record = {}
        self.record.setdefault("minutes", {})

    def add(self, stage, seconds):
        minutes = self.record["minutes"]
        minutes[stage] = round(minutes.get(stage, 0) + seconds / 60, 2)
        self.save()

    def save(self):
        from compress.checkpoints import write_json  # (torch: not for --help)
        write_json(self.record, self.path)


def sweep_finished(workdir, log, sweep_args):
    """Whether the sweep in `workdir` was run to its end with `sweep_args` (--max-drop
    aside): then another budget is decided by sweep.py --pick-again, in seconds."""
    def without_budget(command):
        return command[:command.index("--max-drop")] if "--max-drop" in command else command
    return (log.record.get("sweep") is not None
            and without_budget(log.record["sweep"]) == without_budget(sweep_args)
            and os.path.isfile(os.path.join(workdir, "sweep", "sweep.json")))


def ship(workdir, log):
    """Copy the int8 file the sweep shipped into `workdir` (named .over-budget where it
    missed the budget), removing the one an earlier decision copied; returns its row of
    sweep.json and the copy's name."""
    with open(os.path.join(workdir, "sweep", "sweep.json")) as file:
        [row] = [row for row in json.load(file) if row.get("shipped")]
    name = (SHIPPED if row["picked"] else OVER_BUDGET).format(name=row["name"])
    earlier = log.record.get("shipped")
    if earlier and earlier != name and os.path.isfile(os.path.join(workdir, earlier)):
        os.remove(os.path.join(workdir, earlier))
    source = os.path.join(workdir, os.path.splitext(row["path"])[0] + ".int8.onnx")
    shutil.copy2(source, os.path.join(workdir, name + ".part"))
    os.replace(os.path.join(workdir, name + ".part"), os.path.join(workdir, name))
    log.record["shipped"] = name
    log.save()
    return row, name


def photo_demo(args):
    plan, speed = photo_plan(args)
    workdir = os.path.abspath(args.workdir)
    print(f"\nOn this machine ({describe_cpu()}; VGG16 trains at {speed:.1f} pictures/s here; "
          f"{amp_line(args.amp)}) it will run, in {args.workdir}/:")
    for number, (stage, script, stage_args, minutes) in enumerate(plan, 1):
        print(f"  {number}. {stage}: about {minutes:.0f} min\n       python {script} "
              f"{shlex.join(stage_args)}")
    estimate = sum(m for *_, m in plan)
    print(f"In all about {estimate / 60:.1f} hours; Ctrl-C keeps what is done and the same "
          "command continues. At the end: the file that ships and RESULT.md, in "
          f"{args.workdir}/.", flush=True)
    if args.plan:
        return 0
    os.makedirs(workdir, exist_ok=True)
    log = RunLog(workdir)
    log.record.setdefault("estimate_minutes", round(estimate, 1))
    log.record["max_drop"] = args.max_drop
    log.save()
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
        if script == "sweep.py" and sweep_finished(workdir, log, stage_args):
            print(f"\n{stage}: done before, kept; decide again with --max-drop "
                  f"{args.max_drop:g}, from its stored results")
            stage, stage_args = "decide again", ["--pick-again", "--max-drop",
                                                 f"{args.max_drop:g}"]
        if script == "test.py":
            row, shipped = ship(workdir, log)
            stage_args = ["--compare", "vgg16Net.pth", row["path"], shipped, "--data", "dataset",
                          *COMPARE]
        started = time.perf_counter()
        status = run_stage(script, stage_args, workdir)
        log.add(stage, time.perf_counter() - started)
        if status == 130:
            print("\ndemo: interrupted; what is done is kept: run the same command again to "
                  "continue.", file=sys.stderr)
            return 130
        if status != 0:
            print(f"\ndemo: {script} failed (exit status {status}); stopped.", file=sys.stderr)
            return status
        if script == "sweep.py" and "--pick-again" not in stage_args:
            log.record["sweep"] = stage_args
            log.save()
    from compress.measure.result_page import write_result  # (torch: not for --help)
    page = write_result(workdir, args.photos, log.record)
    print(f"\nDone. In {args.workdir}/: {log.record['shipped']} (the file that ships), "
          f"{os.path.basename(page)} and result.png (what it is worth), compare.json/.png (the "
          "test split), sweep/sweep.json/.png (how it was chosen).")
    return 0


def amp_line(amp):
    """What --amp does on this machine, in a few words."""
    unit = native_bf16()
    if not amp:
        return ("fp32; --amp would train under bf16 autocast on its " + unit) if unit else \
            "fp32 (this CPU computes no bfloat16)"
    return f"--amp: bf16 autocast on its {unit}" if unit else \
        "--amp ignored: this CPU computes no bfloat16, fp32"


def main(args):
    if args.photos is None:
        for flag, given in (("--plan", args.plan), ("--workdir", args.workdir != "photos_run"),
                            ("--amp", args.amp)):
            if given:
                raise UserError(f"{flag}: only with --photos")
        status = synthetic_demo()
    else:
        status = photo_demo(args)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
