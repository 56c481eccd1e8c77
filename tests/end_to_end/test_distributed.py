"""train.py under torchrun: CPU processes (gloo) train one model together.

Checks what a user relies on: the run finishes, only rank 0 (the first machine)
writes files, the validation accuracy it reports is that of the whole val split
-- the same number a single-process test.py measures on the checkpoint it wrote --
and Ctrl-C saves one state that torchrun resumes.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TRAIN_FLAGS, files_under, free_port, generate_demo, run_script

pytestmark = pytest.mark.slow  # (torchrun and real trainings)


def torchrun(*args, nodes=None):
    """`torchrun ... train.py ARGS` as a command line: 2 processes on this machine, or with
    `nodes=(node_rank, port)` this machine as one of 2 machines of 1 process each.

    After a Ctrl-C torchrun kills its processes if they take over --shutdown-timeout
    seconds (30 by default) to save: more, for a busy CI machine.
    """
    if nodes is None:
        layout = ["--standalone", "--nproc_per_node=2"]
    else:
        node_rank, port = nodes
        layout = ["--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                  "--master_addr=127.0.0.1", f"--master_port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *layout, "--shutdown-timeout=300",
            str(REPO / "train.py"), *map(str, args)]


def test_two_machines_train_one_model_and_only_the_first_writes(tmp_path):
    photos = generate_demo(tmp_path / "photos", per_class=11)
    for index in range(7, 11):
        (photos / "dog" / f"dog_{index:04d}.jpg").unlink()
    machines = [tmp_path / "first", tmp_path / "second"]
    for machine in machines:  # dataset/ at the same path on both, as the README asks
        machine.mkdir()
        split = run_script("split_dataset.py", "--source", photos, cwd=machine)
        assert split.returncode == 0, split.stderr
    before = [files_under(machine) for machine in machines]
    val_images = len(list((machines[0] / "dataset" / "val").rglob("*.jpg")))
    assert val_images == 5  # 3 + 2: the two processes' shards differ in length

    port = free_port()
    flags = [*TRAIN_FLAGS, "--epochs", 2, "--batch-size", 4, "--workers", 0, "--device", "cpu",
             "--tensorboard", "board"]
    launched = [subprocess.Popen(torchrun(*flags, nodes=(rank, port)), cwd=machine,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank, machine in enumerate(machines)]
    try:
        (first_out, first_err), (second_out, second_err) = (p.communicate(timeout=900)
                                                            for p in launched)
    finally:
        for process in launched:
            process.kill()  # (a no-op for one that has finished)
    assert [p.returncode for p in launched] == [0, 0], first_err + second_err

    written = sorted(set(files_under(machines[0])) - set(before[0]))
    events = [name for name in written if name.startswith("board/vgg16Net/events.out.tfevents")]
    assert len(events) == 1  # rank 0's: one run, one writer
    assert sorted(set(written) - set(events)) == [
        "class_indices.json", "vgg16Net.history.json", "vgg16Net.history.png", "vgg16Net.pth"]
    assert files_under(machines[1]) == before[1]  # the second machine wrote nothing
    assert first_out.count("train epoch 1/2:") == 1 and "train epoch" not in second_out

    history = json.loads((machines[0] / "vgg16Net.history.json").read_text())
    best = max(record["val_accuracy"] for record in history)
    single = run_script("test.py", "--workers", "0", cwd=machines[0])
    assert single.returncode == 0, single.stderr
    measured = re.search(r"accuracy ([\d.]+)% on (\d+) images", single.stdout)
    assert measured and int(measured.group(2)) == val_images
    assert abs(float(measured.group(1)) / 100 - best) < 5e-5, (single.stdout, history)  # 2 decimals


def test_ctrl_c_under_torchrun_saves_one_state_that_torchrun_resumes(tmp_path):
    """Ctrl-C in the terminal reaches torchrun, which passes it on to both processes."""
    generate_demo(tmp_path / "photos", per_class=8)
    assert run_script("split_dataset.py", "--source", "photos", cwd=tmp_path).returncode == 0
    flags = [*TRAIN_FLAGS, "--epochs", 4, "--batch-size", 2, "--workers", 0, "--device", "cpu"]
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
