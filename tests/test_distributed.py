"""train.py under torchrun: two CPU processes (gloo) train one model together.

Checks what a user relies on: the run finishes, exactly one checkpoint is
written (by rank 0), and the validation accuracy it reports is that of the
whole val split -- the same number a single-process test.py measures on the
checkpoint it wrote.
"""
import json
import re
import subprocess
import sys

from conftest import IMAGE_SIZE, REPO, files_under, generate_demo, run_script


def test_two_process_training_writes_one_checkpoint_with_whole_split_accuracy(tmp_path):
    generate_demo(tmp_path / "photos", per_class=11)  # 8 train + 3 val per class: odd shards
    assert run_script("split_dataset.py", "--source", "photos", cwd=tmp_path).returncode == 0
    before = set(files_under(tmp_path))

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "train.py"), "--image-size", str(IMAGE_SIZE), "--epochs", "2", "--batch-size", "4",
         "--workers", "0", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    written = sorted(set(files_under(tmp_path)) - before)
    assert written == ["class_indices.json", "vgg16Net.history.json", "vgg16Net.history.png",
                       "vgg16Net.pth"]
    assert proc.stdout.count("train epoch 1/2:") == 1  # one process reports

    history = json.loads((tmp_path / "vgg16Net.history.json").read_text())
    best = max(record["val_accuracy"] for record in history)
    single = run_script("test.py", "--workers", "0", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    measured = re.search(r"accuracy ([\d.]+)% on (\d+) images", single.stdout)
    assert measured and int(measured.group(2)) == 6
    assert abs(float(measured.group(1)) / 100 - best) < 5e-5, (single.stdout, history)  # 2 decimals
