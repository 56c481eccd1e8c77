"""tools/train_benchmark.py: train.py's loop against the original demo's plain loop.

How fast this machine is, is not a test; that the tool measures both loops on the
user's data, prints rates whose ratio it computes correctly, and leaves the data
alone, is.
"""
import re

import pytest

from helpers import (TRAIN_FLAGS, assert_clean_error, files_under, generate_demo, run_script,
                     tree_digest)

pytestmark = pytest.mark.slow  # (real trainings)

ROW = re.compile(r"^(.+?)\s+([\d.]+)im/s\s+([\d.]+)im/s\s+([\d.]+)x (.+)$", re.M)


def test_benchmark_prints_each_loops_rate_and_the_ratios_and_leaves_the_data_alone(tmp_path):
    generate_demo(tmp_path / "photos", per_class=8)
    assert run_script("split_dataset.py", "--source", "photos", cwd=tmp_path).returncode == 0
    before = tree_digest(tmp_path)

    proc = run_script("tools/train_benchmark.py", "--data", "dataset", *TRAIN_FLAGS,
                      "--batch-size", 4, "--epochs", 2, "--workers", 0, "--device", "cpu",
                      "--nproc", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert tree_digest(tmp_path) == before  # trained in a temporary folder; nothing written here
    assert "2 epochs of 12 pictures" in proc.stdout  # the split's 6 training pictures per class
    rows = {label.strip(): (float(first), float(later), float(ratio), against)
            for label, first, later, ratio, against in ROW.findall(proc.stdout)}
    assert list(rows) == ["plain loop (original's), 0 workers", "train.py, 0 workers",
                          "same, torchrun 2 processes"], proc.stdout
    plain, single, many = (rows[key][1] for key in rows)
    assert rows["plain loop (original's), 0 workers"][2:] == (1.0, "the plain loop")
    assert rows["train.py, 0 workers"][3] == "the plain loop"
    assert abs(rows["train.py, 0 workers"][2] - single / plain) < 0.01 + 0.01 * single / plain
    assert rows["same, torchrun 2 processes"][3] == "train.py in one process"
    assert abs(rows["same, torchrun 2 processes"][2] - many / single) < 0.01 + 0.01 * many / single


def test_a_batch_that_does_not_split_over_the_processes_is_a_one_line_error(tmp_path):
    proc = run_script("tools/train_benchmark.py", "--nproc", 3, "--batch-size", 4, cwd=tmp_path)
    assert_clean_error(proc, "--batch-size 4", "--nproc 3")
    assert files_under(tmp_path) == []
