"""The whole pipeline, driven through the real command lines in one folder:

    demo pictures -> split_dataset.py -> train.py -> pruner.py -> knowledge_distillation.py
    -> test.py (accuracy, --pruned, --image, --compare)

The first four stages run once per session (the `pipeline` fixture in conftest.py:
12 pictures per class, 32 px, 1 epoch each); this file checks their hand-offs and
runs test.py's modes in the same folder.
"""
import json
import os
import re

import pytest
import torch

import model as vgg
from helpers import CLASSIFIER_WIDTH, IMAGE_SIZE, run_script

# VGG16's 14.7M convolution parameters under the narrow head the pipeline fixture trains
DENSE_PARAMS = 16_324_674
CHECKPOINTS = {"dense": "vgg16Net.pth", "pruned": "pruned_vgg16_net.pth",
               "distilled": "finetuned_vgg16_net.pth"}
TIMESTAMPED_LOG = re.compile(r"^\[20\d\d-\d\d-\d\d", re.MULTILINE)  # NNI's INFO lines


def assert_quiet(proc, stage):
    """No traceback, no library warnings or log lines leaking to the user."""
    for stream_name in ("stdout", "stderr"):
        text = getattr(proc, stream_name)
        assert "Traceback" not in text, f"{stage} {stream_name}:\n{text}"
        assert "FutureWarning" not in text, f"{stage} {stream_name}:\n{text}"
        assert "DeprecationWarning" not in text, f"{stage} {stream_name}:\n{text}"
        assert not TIMESTAMPED_LOG.search(text), f"{stage} {stream_name}:\n{text}"


def load(pipeline, name):
    return torch.load(pipeline.path(name), map_location="cpu", weights_only=True)


def test_every_stage_succeeds_quietly(pipeline):
    assert list(pipeline.procs) == ["split", "train", "prune", "distill"]
    for stage, proc in pipeline.procs.items():
        assert proc.returncode == 0, f"{stage}:\n{proc.stderr}"
        assert_quiet(proc, stage)


def test_split_hands_train_and_val_folders_to_training(pipeline):
    for part, count in (("train", 8), ("val", 4)):
        for name in ("cat", "dog"):
            assert len(list(pipeline.path(f"dataset/{part}/{name}").glob("*.jpg"))) == count
    assert "Split 24 images of 2 classes" in pipeline.procs["split"].stdout


def test_training_writes_checkpoint_class_index_and_history(pipeline):
    assert json.loads(pipeline.path("class_indices.json").read_text()) == {"0": "cat", "1": "dog"}
    checkpoint = load(pipeline, "vgg16Net.pth")
    assert checkpoint["kind"] == "dense" and checkpoint["image_size"] == IMAGE_SIZE
    assert vgg.architecture_of(vgg.build_model(classifier_width=CLASSIFIER_WIDTH),
                               "vgg16") == checkpoint["architecture"]
    assert sum(t.numel() for k, t in checkpoint["state_dict"].items()) == DENSE_PARAMS
    history = json.loads(pipeline.path("vgg16Net.history.json").read_text())
    assert [r["epoch"] for r in history] == [1]
    assert checkpoint["metrics"]["val_accuracy"] == history[0]["val_accuracy"]
    assert pipeline.path("vgg16Net.history.png").stat().st_size > 1000
    assert "train epoch 1/1" in pipeline.procs["train"].stdout
    # training images per second, validation left out: faster than the whole epoch's rate
    images = len(list(pipeline.path("dataset/train").rglob("*.jpg")))
    rate = history[0]["images_per_second"]
    assert images / history[0]["seconds"] <= rate < 10 * images / history[0]["seconds"]
    assert f"| {rate:.1f} img/s," in pipeline.procs["train"].stdout


def test_pruner_hands_a_four_times_smaller_model_to_distillation(pipeline):
    checkpoint = load(pipeline, "pruned_vgg16_net.pth")
    assert checkpoint["kind"] == "pruned"
    params = sum(t.numel() for k, t in checkpoint["state_dict"].items())
    assert params <= 0.30 * DENSE_PARAMS
    metrics = checkpoint["metrics"]
    assert metrics["params_before"] == DENSE_PARAMS and metrics["params_after"] == params
    assert metrics["flops_after"] <= 0.30 * metrics["flops_before"]
    assert checkpoint["class_names"] == ["cat", "dog"]
    assert pipeline.path("pruned_vgg16_net.channels.png").stat().st_size > 1000
    out = pipeline.procs["prune"].stdout
    assert re.search(r"conv1\s+64\s+32", out) and re.search(r"fc1\s+64\s+32", out)
    assert "matches the masked model" in out
    assert os.path.getsize(pipeline.path("pruned_vgg16_net.pth")) < \
        0.3 * os.path.getsize(pipeline.path("vgg16Net.pth"))


def test_distillation_writes_a_finetuned_student_and_history(pipeline):
    checkpoint = load(pipeline, "finetuned_vgg16_net.pth")
    pruned = load(pipeline, "pruned_vgg16_net.pth")
    assert checkpoint["kind"] == "finetuned"
    assert checkpoint["architecture"] == pruned["architecture"]
    changed = [k for k, v in checkpoint["state_dict"].items()
               if not torch.equal(v, pruned["state_dict"][k])]
    assert changed, "distillation did not change the student"
    history = json.loads(pipeline.path("finetuned_vgg16_net.history.json").read_text())
    assert len(history) == 1 and checkpoint["metrics"]["val_accuracy"] == history[0]["val_accuracy"]
    assert pipeline.path("finetuned_vgg16_net.history.png").stat().st_size > 1000
    assert checkpoint["metrics"]["teacher"] == "vgg16Net.pth"


def accuracy_line(stdout, path):
    match = re.search(rf"^{re.escape(path)}: accuracy (\d+\.\d\d)% on (\d+) images", stdout,
                      re.MULTILINE)
    assert match, stdout
    return float(match.group(1)), int(match.group(2))


def test_test_py_reports_the_dense_models_accuracy(pipeline):
    proc = run_script("test.py", "--workers", 0, cwd=pipeline.root)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc, "test")
    accuracy, count = accuracy_line(proc.stdout, "vgg16Net.pth")
    assert count == 8
    # the same validation images as training's: the same accuracy it recorded
    recorded = load(pipeline, "vgg16Net.pth")["metrics"]["val_accuracy"]
    assert accuracy == pytest.approx(100 * recorded)
    assert pipeline.path("vgg16Net.confusion.png").stat().st_size > 1000


def test_test_py_pruned_reports_the_distilled_models_accuracy(pipeline):
    proc = run_script("test.py", "--pruned", "--workers", 0, cwd=pipeline.root)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc, "test --pruned")
    accuracy, count = accuracy_line(proc.stdout, "finetuned_vgg16_net.pth")
    recorded = load(pipeline, "finetuned_vgg16_net.pth")["metrics"]["val_accuracy"]
    assert count == 8 and accuracy == pytest.approx(100 * recorded)
    assert pipeline.path("finetuned_vgg16_net.confusion.png").stat().st_size > 1000


def test_test_py_classifies_one_picture(pipeline):
    picture = sorted(pipeline.path("dataset/val/dog").glob("*.jpg"))[0]
    proc = run_script("test.py", "--image", picture, cwd=pipeline.root)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc, "test --image")
    probabilities = dict(re.findall(r"^\s+(cat|dog)\s+(\d+\.\d)%$", proc.stdout, re.MULTILINE))
    assert set(probabilities) == {"cat", "dog"}, proc.stdout
    assert sum(map(float, probabilities.values())) == pytest.approx(100, abs=0.15)
    best = max(probabilities, key=lambda name: float(probabilities[name]))
    assert f"{picture}: {best}" in proc.stdout
    saved = pipeline.path(picture.stem + ".prediction.png")
    assert saved.stat().st_size > 1000


@pytest.fixture(scope="module")
def comparison(pipeline):
    proc = run_script("test.py", "--compare", "--repeats", 2, "--max-repeats", 4, "--warmup", 1,
                      "--workers", 0,
                      cwd=pipeline.root)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(pipeline.path("compare.json").read_text())


def test_compare_measures_the_three_models_side_by_side(pipeline, comparison):
    proc, rows = comparison
    assert_quiet(proc, "test --compare")
    assert [row["name"] for row in rows] == list(CHECKPOINTS)
    assert [row["path"] for row in rows] == list(CHECKPOINTS.values())
    for row in rows:
        for field in ("accuracy", "params", "flops", "file_bytes", "latency_ms",
                      "throughput_ips", "device", "threads", "image_size"):
            assert field in row, (row["name"], field)
        assert 0 <= row["accuracy"] <= 1
        assert row["file_bytes"] == os.path.getsize(pipeline.path(row["path"]))
        assert row["latency_ms"] > 0 and row["throughput_ips"] > 0
        assert row["device"] == "cpu" and row["threads"] >= 1
        assert row["image_size"] == IMAGE_SIZE
        assert pipeline.path(row["path"]).with_suffix(".confusion.png").stat().st_size > 1000
    dense, pruned, distilled = rows
    assert dense["params"] == DENSE_PARAMS
    assert pruned["params"] == distilled["params"] <= 0.30 * dense["params"]
    assert pruned["flops"] == distilled["flops"] <= 0.30 * dense["flops"]
    for row, name in ((dense, "vgg16Net.pth"), (distilled, "finetuned_vgg16_net.pth")):
        assert row["accuracy"] == load(pipeline, name)["metrics"]["val_accuracy"]
    assert pipeline.path("compare.png").stat().st_size > 1000
    assert "dense" in proc.stdout and "distilled" in proc.stdout
