"""train.py under torchrun: two CPU processes (gloo) train one model together.

Checks what a user relies on: the run finishes, exactly one checkpoint is
written (by rank 0), and the validation accuracy it reports is that of the
whole val split -- the same number a single-process test.py measures on the
checkpoint it wrote.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import IMAGE_SIZE, REPO, files_under, generate_demo, run_script


def torchrun(*args):
    """`torchrun --standalone --nproc_per_node=2 train.py ARGS`, as a command line.

    After a Ctrl-C torchrun kills its processes if they take over --shutdown-timeout
    seconds (30 by default) to save: more, for a busy CI machine.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--shutdown-timeout=300", str(REPO / "train.py"), *map(str, args)]


def test_two_process_training_writes_one_checkpoint_with_whole_split_accuracy(tmp_path):
    generate_demo(tmp_path / "photos", per_class=11)  # 8 train + 3 val per class: odd shards
    assert run_script("split_dataset.py", "--source", "photos", cwd=tmp_path).returncode == 0
    before = set(files_under(tmp_path))

    proc = subprocess.run(torchrun("--image-size", IMAGE_SIZE, "--epochs", 2, "--batch-size", 4,
                                   "--workers", 0, "--device", "cpu"),
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


def test_ctrl_c_under_torchrun_saves_one_state_that_torchrun_resumes(tmp_path):
    """Ctrl-C in the terminal reaches torchrun, which passes it on to both processes."""
    generate_demo(tmp_path / "photos", per_class=8)
    assert run_script("split_dataset.py", "--source", "photos", cwd=tmp_path).returncode == 0
    flags = ["--image-size", IMAGE_SIZE, "--epochs", 4, "--batch-size", 2, "--workers", 0,
             "--device", "cpu"]
    proc = subprocess.Popen(torchrun(*flags), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    history = tmp_path / "vgg16Net.history.json"
    deadline = time.monotonic() + 300
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)

    assert (tmp_path / "vgg16Net.state.pth").exists(), out + err
    assert err.count("Stopping after this batch") == 1, err  # one message, not one per process
    assert err.count("train.py: interrupted. Saved the state") == 1, err
    assert "Traceback" not in err.split("train.py: interrupted.")[0], err  # (torchrun's own after)

    resumed = subprocess.run(torchrun(*flags, "--resume", "vgg16Net.state.pth"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from vgg16Net.state.pth: epoch 2" in resumed.stdout
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1, 2, 3, 4]
    assert not (tmp_path / "vgg16Net.state.pth").exists()
