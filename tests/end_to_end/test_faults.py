"""The fault matrix: every writing stage, through its real command line, on a machine that
misbehaves -- a disk too small (a real tmpfs mounted for the case), a read-only folder (a
tmpfs mounted read-only), an output another run is writing, a --cache that cannot fit.

Each case checks the exit status, the one line said, what is on disk afterwards (loads,
or absent), and that what the stage read (the split, the checkpoints) is byte-identical.
A refusal before any work runs the stage's CLI edge in this process (`here`); a stage
that writes, is killed or holds a lock runs as a process of its own.
Mounting needs root (as on CI); elsewhere the disk cases are skipped, saying why.
"""
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, assert_clean_error, load_script, run_in_process, run_script

SCRIPTS = {}


def here(stage, *args, cwd):
    """`stage` (e.g. 'train.py') through its CLI edge in this process."""
    name = stage[:-len(".py")]
    SCRIPTS.setdefault(name, load_script(name))
    return run_in_process(SCRIPTS[name], *args, cwd=cwd)

pytestmark = pytest.mark.slow


def tree_digest(*paths):
    """One SHA-256 of every file under `paths` (names and bytes)."""
    digest = hashlib.sha256()
    for top in map(Path, paths):
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in files:
            if path.is_file():
                digest.update(str(path.relative_to(top.parent)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def mounted(folder, megabytes, read_only=False):
    """A tmpfs of `megabytes` at `folder` for the block (read-only if asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={megabytes}m" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({done.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def inputs(pipeline, tmp_path):
    """The pipeline's split and checkpoints linked into tmp_path, and their digest."""
    for name in ("dataset", "vgg16Net.pth", "pruned_vgg16_net.pth", "finetuned_vgg16_net.pth"):
        os.symlink(pipeline.path(name), tmp_path / name)
    read = [pipeline.path(n) for n in ("dataset", "photos", "vgg16Net.pth",
                                       "pruned_vgg16_net.pth", "finetuned_vgg16_net.pth")]
    return read, tree_digest(*read)


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# (stage, its arguments with DISK standing for the small disk, the file it writes there)
ROOM_REFUSED = [
    ("train.py", ["--output", "DISK/vgg16Net.pth", "--class-index", "DISK/classes.json",
                  "--image-size", 32, "--epochs", 1, "--batch-size", 8], "DISK/vgg16Net.pth"),
    ("knowledge_distillation.py", ["--output", "DISK/student.pth", "--epochs", 1,
                                   "--batch-size", 8], "DISK/student.pth"),
    ("export.py", ["--weights", "finetuned_vgg16_net.pth", "--output", "DISK/model.onnx"],
     "DISK/model.onnx"),
    ("sweep.py", ["--output-dir", "DISK/sweep", "--kd-epochs", 1, "--batch-size", 8,
                  "--sparsities", 0.5], "DISK/sweep"),
    ("split_dataset.py", ["--source", "photos", "--dest", "DISK/split"], "DISK/split"),
]


@pytest.mark.parametrize("stage,args,named", ROOM_REFUSED, ids=[c[0] for c in ROOM_REFUSED])
def test_a_disk_too_small_is_refused_before_any_work_in_one_line(pipeline, inputs, tmp_path,
                                                                   stage, args, named):
    read, digest = inputs
    if stage == "split_dataset.py":
        os.symlink(pipeline.path("photos"), tmp_path / "photos")
    with mounted(tmp_path / "disk", 1) as disk:
        args = [str(a).replace("DISK", str(disk)) for a in args]
        started = time.monotonic()
        proc = here(stage, *args, "--workers", 0, cwd=tmp_path)
        line = assert_clean_error(proc, named.replace("DISK", str(disk)), "needs about",
                                  "free", "nothing was started")
        assert files_in(disk) == [], line  # (not even an empty folder or a lock)
    assert time.monotonic() - started < 60  # told now, not after the run
    assert tree_digest(*read) == digest


def test_a_disk_that_fills_while_saving_is_one_line_and_leaves_no_partial_file(inputs,
                                                                                tmp_path):
    """pruner.py knows its file's size only once pruned: the save itself meets the full
    disk (inside torch.save), and says which file, how much and how much was free."""
    read, digest = inputs
    pruned_bytes = os.path.getsize(tmp_path / "pruned_vgg16_net.pth")
    with mounted(tmp_path / "disk", max(1, pruned_bytes // 2 ** 21)) as disk:
        proc = run_script("pruner.py", "--output", disk / "pruned.pth", cwd=tmp_path)
        line = assert_clean_error(proc, disk / "pruned.pth", "the disk is full", "needs about",
                                  "free in", "no file was left there")
        assert files_in(disk) == []
    assert tree_digest(*read) == digest
    assert "MB" in line


def test_a_full_disk_keeps_the_earlier_checkpoint_intact(inputs, tmp_path):
    read, digest = inputs
    pruned_bytes = os.path.getsize(tmp_path / "pruned_vgg16_net.pth")
    with mounted(tmp_path / "disk", pruned_bytes // 2 ** 20 + 2) as disk:
        first = run_script("pruner.py", "--output", disk / "pruned.pth", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        before = (disk / "pruned.pth").read_bytes()
        proc = run_script("pruner.py", "--output", disk / "pruned.pth", "--sparsity", 0.3,
                          cwd=tmp_path)  # a bigger model, and the old one still there
        assert_clean_error(proc, disk / "pruned.pth", "the disk is full",
                           "the file there is as it was")
        assert (disk / "pruned.pth").read_bytes() == before
        assert torch.load(disk / "pruned.pth", weights_only=True)["kind"] == "pruned"
        assert not [name for name in files_in(disk) if name.endswith(".tmp")]
    assert tree_digest(*read) == digest


READ_ONLY = [
    ("train.py", ["--output", "RO/vgg16Net.pth", "--image-size", 32, "--epochs", 1]),
    ("pruner.py", ["--output", "RO/pruned.pth"]),
    ("knowledge_distillation.py", ["--output", "RO/student.pth", "--epochs", 1]),
    ("export.py", ["--weights", "finetuned_vgg16_net.pth", "--output", "RO/model.onnx"]),
    ("sweep.py", ["--output-dir", "RO/sweep", "--kd-epochs", 1, "--sparsities", 0.5]),
    ("split_dataset.py", ["--source", "dataset/train", "--dest", "RO/split"]),
    ("test.py", ["--compare", "vgg16Net.pth", "finetuned_vgg16_net.pth",
                 "--report", "RO/compare.json"]),
]


@pytest.mark.parametrize("stage,args", READ_ONLY, ids=[c[0] for c in READ_ONLY])
def test_a_read_only_output_folder_is_refused_before_any_work(inputs, tmp_path, stage, args):
    read, digest = inputs
    with mounted(tmp_path / "ro", 1, read_only=True) as folder:
        args = [str(a).replace("RO", str(folder)) for a in args]
        started = time.monotonic()
        proc = here(stage, *args, cwd=tmp_path)
        assert_clean_error(proc, str(folder), "cannot write", "Read-only file system")
        assert files_in(folder) == []
    assert time.monotonic() - started < 60
    assert tree_digest(*read) == digest


def test_a_read_only_split_is_read_and_trained_on(pipeline, tmp_path):
    """The stages only read DATA: a split on a read-only disk trains as any other."""
    with mounted(tmp_path / "ro", 64) as folder:
        subprocess.run(["cp", "-a", f"{pipeline.path('dataset')}/.", str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        digest = tree_digest(folder)
        proc = run_script("train.py", "--data", folder, "--image-size", 32, "--epochs", 1,
                          "--batch-size", 8, "--workers", 0, "--classifier-width", 64,
                          cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert tree_digest(folder) == digest
    assert torch.load(tmp_path / "vgg16Net.pth", weights_only=True)["kind"] == "dense"


HOLD = """
import sys, time
from compress.machine.resources import output_lock
with output_lock(sys.argv[1], "--output", folder=sys.argv[2] == "folder"):
    print("holding", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def held(path, folder):
    """Another run holding the lock of `path` (started, then SIGKILLed after the block)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path),
                               "folder" if folder else "file"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    try:
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


LOCKED = [
    ("knowledge_distillation.py", ["--output", "student.pth", "--epochs", 1, "--batch-size", 8],
     "student.pth", "--output", False),
    ("train.py", ["--output", "dense.pth", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
                  "--class-index", "classes.json"], "dense.pth", "--output", False),
    ("sweep.py", ["--output-dir", "sweep", "--kd-epochs", 1, "--batch-size", 8,
                  "--sparsities", 0.5, "--repeats", 2, "--max-repeats", 3, "--target", "pytorch"],
     "sweep", "--output-dir", True),  # (measured as checkpoints: no ONNX file to make)
]


@pytest.mark.parametrize("stage,args,output,flag,folder", LOCKED, ids=[c[0] for c in LOCKED])
def test_a_second_run_into_the_same_output_is_refused_and_a_killed_one_frees_it(
        inputs, tmp_path, stage, args, output, flag, folder):
    read, digest = inputs
    with held(tmp_path / output, folder) as holder:
        proc = run_script(stage, *args, "--workers", 0, cwd=tmp_path)
        assert_clean_error(proc, output, "another run", f"process {holder.pid}",
                           "is writing it now")
        assert not (tmp_path / output).exists() or folder
    # the holder was killed: its lock went with it, and the same command runs
    proc = run_script(stage, *args, "--workers", 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    checkpoint = tmp_path / output / "l1-0.5.pth" if folder else tmp_path / output
    assert torch.load(checkpoint, weights_only=True)["format"]
    assert tree_digest(*read) == digest


def test_a_cache_that_cannot_fit_in_memory_is_refused_before_decoding(inputs, tmp_path):
    read, digest = inputs
    started = time.monotonic()
    # 16 training pictures of 3 x 34500^2 bytes: about 57 GB, more than this machine has
    proc = here("train.py", "--cache", "--image-size", 30000, "--epochs", 1, "--output",
                "big.pth", cwd=tmp_path)
    assert_clean_error(proc, "--cache", "of memory", "available", "pictures of")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "big.pth").exists()
    assert tree_digest(*read) == digest
