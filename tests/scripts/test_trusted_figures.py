"""Specification of figures that can be trusted: accuracy on the held-out test split where
there is one (checkpoints are chosen on val), every accuracy with its 95% interval, and a
model against the first one as a paired difference on the same pictures -- printed by
test.py and kept in compare.json. A narrow VGG16 and a student pruned from it, toy pictures.
"""
import json

import pytest

from compress.checkpoints import atomic_save, load_checkpoint
from compress.pruning.channels import Pruning, prune_checkpoint
from helpers import load_script, run_in_process, small_checkpoint, toy_pictures

test_py = load_script("test")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trusted")
    for part, count, seed in (("train", 4, 0), ("val", 3, 1), ("test", 5, 2)):
        toy_pictures(folder / "dataset" / part, count, seed=seed)
    dense = str(small_checkpoint(folder / "dense.pth", class_names=("dark", "light")))
    pruned, _ = prune_checkpoint(load_checkpoint(dense), dense, Pruning(sparsity=0.5))
    atomic_save(pruned, str(folder / "pruned.pth"))
    return folder


def test_accuracy_is_reported_on_test_with_its_interval(folder):
    proc = run_in_process(test_py, "--weights", "dense.pth", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert "on 10 images of dataset/test (95% interval" in line, line


def test_without_a_test_split_it_says_val(folder, tmp_path):
    for part in ("train", "val"):
        (tmp_path / part).symlink_to(folder / "dataset" / part)
    proc = run_in_process(test_py, "--weights", folder / "dense.pth", "--data", tmp_path,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"on 6 images of {tmp_path}/val" in proc.stdout


def test_compare_keeps_intervals_and_the_paired_difference(folder):
    proc = run_in_process(test_py, "--compare", "dense.pth", "pruned.pth", "--repeats", 2,
                          "--max-repeats", 2, "--warmup", 0, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "test acc [95%]" in proc.stdout and "vs first [95%]" in proc.stdout
    dense, pruned = json.loads((folder / "compare.json").read_text())
    for row in (dense, pruned):
        assert row["split"] == "test" and row["val_images"] == 10
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        assert len(row["by_split"]["test"]["hits"]) == 10
        assert sum(row["by_split"]["test"]["hits"]) == round(10 * row["accuracy"])
    difference = pruned["difference"]
    assert difference["difference"] == pytest.approx(pruned["accuracy"] - dense["accuracy"])
    assert difference["low"] <= difference["difference"] <= difference["high"]
    assert difference["only_a"] + difference["only_b"] == sum(
        a != b for a, b in zip(dense["by_split"]["test"]["hits"],
                               pruned["by_split"]["test"]["hits"]))
    assert "difference" not in dense  # (the first model is what the others are against)
