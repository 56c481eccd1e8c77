"""Run the whole pipeline on synthetic demo pictures, as a newcomer would type it.

Draws cat and dog pictures into demo/demo_animals/ (never into your animals/),
then runs the six stages from inside demo/, so their outputs (dataset/,
vgg16Net.pth, pruned_vgg16_net.pth, finetuned_vgg16_net.pth, its .onnx and
.int8.onnx, figures) land in demo/ and nothing of yours in the project folder is
touched. Each command is printed before it runs; the last one prints the
dense -> pruned -> distilled -> int8 table.

The settings below are chosen to finish in about 10 minutes on a 2-core CPU
(VGG16 with batch norm at 48 px); see README.md for what they measured.

    python tools/demo.py
"""
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join(REPO, "demo")

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


def first_picture(folder):
    return os.path.join(folder, sorted(os.listdir(os.path.join(WORKDIR, folder)))[0])


def main():
    os.makedirs(WORKDIR, exist_ok=True)
    started = time.perf_counter()
    for script, args in STAGES:
        args = [arg() if callable(arg) else arg for arg in args]
        command = [sys.executable, os.path.join(REPO, script), *args]
        print(f"\n$ python {script} {shlex.join(args)}", flush=True)
        result = subprocess.run(command, cwd=WORKDIR)
        if result.returncode != 0:
            print(f"\ndemo: {script} failed (exit status {result.returncode}); stopped.",
                  file=sys.stderr)
            return result.returncode
    minutes = (time.perf_counter() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Outputs are in {os.path.relpath(WORKDIR)}/: "
          "compare.png, *.history.png, pruned_vgg16_net.channels.png, *.confusion.png, "
          "<picture>.prediction.png, finetuned_vgg16_net.onnx and .int8.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
