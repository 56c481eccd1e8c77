"""Specification of Ctrl-C and --resume through the real command lines: a run stopped
by SIGINT saves a resumable state, and resuming it ends exactly where an uninterrupted
run with the same seed and flags ends. (tests/test_training.py checks the final
weights and each refusal of training.py in-process.)
"""
import json
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from helpers import (IMAGE_SIZE, REPO, TRAIN_FLAGS, assert_clean_error, generate_demo, load_script,
                     run_in_process, small_checkpoint)

train, split_dataset = load_script("train"), load_script("split_dataset")
FLAGS = ["--data", "../dataset", *TRAIN_FLAGS, "--epochs", 2, "--batch-size", 2, "--workers", 0,
         "--seed", 3]


def train_command(*extra):
    return [sys.executable, str(REPO / "train.py"), *map(str, FLAGS), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-epoch run, and one stopped by SIGINT early in epoch 2 and resumed.

    2 training pictures per class and batches of 2: 2 batches per epoch.
    """
    root = tmp_path_factory.mktemp("resume")
    generate_demo(root / "photos", per_class=3)
    split = run_in_process(split_dataset, "--source", "photos", "--ratio", "0.67", cwd=root)
    assert split.returncode == 0, split.stderr
    straight, stopped = root / "straight", root / "stopped"
    straight.mkdir()
    stopped.mkdir()
    result = {"straight_dir": straight, "stopped_dir": stopped}

    result["straight"] = subprocess.run(train_command(), cwd=straight, capture_output=True,
                                        text=True, timeout=600)

    proc = subprocess.Popen(train_command(), cwd=stopped, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = stopped / "vgg16Net.history.json"
    deadline = time.monotonic() + 300
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    epochs_done = len(json.loads(history.read_text())) if history.exists() else None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    result["interrupted"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result["epochs_done_at_signal"] = epochs_done
    state_path = stopped / "vgg16Net.state.pth"
    result["state"] = (torch.load(state_path, map_location="cpu", weights_only=True)
                       if state_path.exists() else None)

    result["resumed"] = subprocess.run(train_command("--resume", "vgg16Net.state.pth"),
                                       cwd=stopped, capture_output=True, text=True, timeout=600)
    return result


def test_uninterrupted_run_succeeds(runs):
    assert runs["straight"].returncode == 0, runs["straight"].stderr
    assert "train epoch 2/2" in runs["straight"].stdout


def test_ctrl_c_exits_130_and_says_how_to_resume(runs):
    proc = runs["interrupted"]
    assert runs["epochs_done_at_signal"] == 1
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--resume vgg16Net.state.pth" in proc.stderr
    assert "train epoch 2/2" not in proc.stdout


def test_ctrl_c_saves_a_plain_data_training_state_mid_epoch(runs):
    state = runs["state"]
    assert state is not None, "vgg16Net.state.pth was not written"
    assert state["format"] == "vgg-prune-distill-state/2"
    assert state["epoch"] == 1  # 0-based: the second epoch
    assert state["samples_done"] == 2  # stopped after the first of two batches
    assert len(state["history"]) == 1
    assert set(state["model"]) >= {"features.0.weight", "classifier.6.bias"}


def test_resumed_run_finishes_and_removes_its_state(runs):
    proc = runs["resumed"]
    assert proc.returncode == 0, proc.stderr
    done = runs["state"]["samples_done"]
    assert f"Resuming from vgg16Net.state.pth: epoch 2, {done} images done" in proc.stdout
    assert "train epoch 2/2" in proc.stdout and "train epoch 1/2" not in proc.stdout
    assert not (runs["stopped_dir"] / "vgg16Net.state.pth").exists()


TIMING = ("seconds", "images_per_second", "teacher_share")  # (wall-clock figures)


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def test_resumed_run_saves_the_same_best_checkpoint_as_an_uninterrupted_run(runs):
    straight = torch.load(runs["straight_dir"] / "vgg16Net.pth", weights_only=True)
    resumed = torch.load(runs["stopped_dir"] / "vgg16Net.pth", weights_only=True)
    # (if the best is epoch 1's, both files were written before the Ctrl-C; that the
    # weights after a resume are exact is shown by test_training.py on final weights)
    assert straight["metrics"]["epoch"] == resumed["metrics"]["epoch"]
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert ({k: v for k, v in straight["metrics"].items() if k not in TIMING}
            == {k: v for k, v in resumed["metrics"].items() if k not in TIMING})


def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(runs):
    """The last epoch's losses are computed from the final weights: equal to the last bit.

    (Guards against, e.g., the DataLoader drawing its base seed from the global RNG
    that dropout uses: a resumed run would then draw once more after restoring it.)
    """
    straight = json.loads((runs["straight_dir"] / "vgg16Net.history.json").read_text())
    resumed = json.loads((runs["stopped_dir"] / "vgg16Net.history.json").read_text())
    assert len(straight) == len(resumed) == 2
    assert without_timing(resumed) == without_timing(straight)


@pytest.fixture(scope="module")
def killed(runs, tmp_path_factory):
    """A run killed (SIGKILL: no Ctrl-C handler runs) during its second epoch, then the
    same command again, then with --resume."""
    folder = tmp_path_factory.mktemp("killed")
    shutil.copytree(runs["stopped_dir"].parent / "dataset", folder / "dataset")
    (folder / "run").mkdir()
    proc = subprocess.Popen(train_command(), cwd=folder / "run", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = folder / "run" / "vgg16Net.history.json"
    deadline = time.monotonic() + 300
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    epochs_done = len(json.loads(history.read_text())) if history.exists() else None
    proc.kill()
    proc.communicate(timeout=60)
    state_path = folder / "run" / "vgg16Net.state.pth"
    state = torch.load(state_path, weights_only=True) if state_path.exists() else None
    again = subprocess.run(train_command(), cwd=folder / "run", capture_output=True, text=True,
                           timeout=600)
    resumed = subprocess.run(train_command("--resume", "vgg16Net.state.pth"),
                             cwd=folder / "run", capture_output=True, text=True, timeout=600)
    return types.SimpleNamespace(folder=folder / "run", epochs_done=epochs_done, state=state,
                                 again=again, resumed=resumed)


def test_a_killed_run_loses_only_the_epoch_it_was_in(runs, killed):
    assert killed.epochs_done == 1
    assert killed.state is not None, "no state was left after the first epoch"
    assert killed.state["epoch"] == 1 and killed.state["samples_done"] == 0
    assert len(killed.state["history"]) == 1
    # the same command again is refused in one line, the file named
    assert_clean_error(killed.again, "vgg16Net.state.pth", "--resume vgg16Net.state.pth")
    proc = killed.resumed
    assert proc.returncode == 0, proc.stderr
    assert "Resuming from vgg16Net.state.pth: epoch 2, 0 images done" in proc.stdout
    assert "train epoch 1/2" not in proc.stdout
    assert not (killed.folder / "vgg16Net.state.pth").exists()
    straight = json.loads((runs["straight_dir"] / "vgg16Net.history.json").read_text())
    resumed = json.loads((killed.folder / "vgg16Net.history.json").read_text())
    assert without_timing(resumed) == without_timing(straight)


def test_a_finished_run_leaves_no_state(runs):
    assert runs["straight"].returncode == 0
    assert not (runs["straight_dir"] / "vgg16Net.state.pth").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path):
    proc = run_in_process(train, "--device", "cuda", cwd=tmp_path)
    assert_clean_error(proc, "--device cuda", "CUDA")
    assert list(tmp_path.iterdir()) == []


DISTILL = [sys.executable, str(REPO / "knowledge_distillation.py"), "--epochs", "2",
           "--batch-size", "2", "--workers", "2"]  # loader workers see Ctrl-C too


@pytest.fixture(scope="module")
def distillation(pipeline, tmp_path_factory):
    """Distillation of the pipeline's models, never stopped and stopped by SIGINT in epoch 2."""
    folders = {}
    for name in ("straight", "stopped"):
        folder = folders[name] = tmp_path_factory.mktemp(f"distill_{name}")
        shutil.copytree(pipeline.path("dataset"), folder / "dataset")
        for checkpoint in ("vgg16Net.pth", "pruned_vgg16_net.pth"):
            shutil.copy(pipeline.path(checkpoint), folder / checkpoint)
    result = {"folders": folders}
    result["straight"] = subprocess.run(DISTILL, cwd=folders["straight"], capture_output=True,
                                        text=True, timeout=600)
    proc = subprocess.Popen(DISTILL, cwd=folders["stopped"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = folders["stopped"] / "finetuned_vgg16_net.history.json"
    deadline = time.monotonic() + 300
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    result["interrupted"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    state = folders["stopped"] / "finetuned_vgg16_net.state.pth"
    assert state.exists(), f"Ctrl-C saved no state:\n{out}\n{err}"
    result["state"] = torch.load(state, weights_only=True)
    shutil.copy(state, folders["stopped"] / "kept.state.pth")  # for the refusals below
    result["resumed"] = subprocess.run(DISTILL + ["--resume", "finetuned_vgg16_net.state.pth"],
                                       cwd=folders["stopped"], capture_output=True, text=True,
                                       timeout=600)
    return result


def test_ctrl_c_during_distillation_saves_a_state_that_resumes(distillation):
    proc = distillation["interrupted"]
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--resume finetuned_vgg16_net.state.pth" in proc.stderr
    state = distillation["state"]
    assert state["epoch"] == 1 and 0 < state["samples_done"] < 16

    resumed = distillation["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    assert "distill epoch 2/2" in resumed.stdout and "distill epoch 1/2" not in resumed.stdout
    folder = distillation["folders"]["stopped"]
    assert not (folder / "finetuned_vgg16_net.state.pth").exists()


def test_resumed_distillation_ends_exactly_where_an_uninterrupted_one_ends(distillation):
    assert distillation["straight"].returncode == 0, distillation["straight"].stderr
    straight, stopped = (json.loads((distillation["folders"][name] /
                                     "finetuned_vgg16_net.history.json").read_text())
                         for name in ("straight", "stopped"))
    assert len(straight) == 2
    assert without_timing(stopped) == without_timing(straight)


def test_distillation_state_records_what_a_resume_must_keep(distillation):
    settings = distillation["state"]["settings"]
    assert settings["image_size"] == IMAGE_SIZE  # the student's size, not the unset flag
    assert settings["temperature"] == 8.0 and settings["alpha"] == 0.99
    assert settings["teacher"].startswith("vgg16Net.pth (sha256 ")


kd = load_script("knowledge_distillation")


@pytest.mark.parametrize("flags, named", [(["--temperature", "4"], "--temperature 8.0 (now 4.0)"),
                                          (["--alpha", "0.5"], "--alpha 0.99 (now 0.5)"),
                                          (["--teacher", "copy.pth"], "--teacher vgg16Net.pth")])
def test_resumed_distillation_refuses_another_temperature_alpha_or_teacher(distillation, flags,
                                                                          named):
    folder = distillation["folders"]["stopped"]
    shutil.copy(folder / "vgg16Net.pth", folder / "copy.pth")
    proc = run_in_process(kd, "--epochs", 2, "--batch-size", 2, "--workers", 0, *flags,
                          "--resume", "kept.state.pth", cwd=folder)
    assert_clean_error(proc, "kept.state.pth", named, "same flags and files")


def test_resumed_distillation_refuses_a_teacher_changed_in_place(distillation, tmp_path):
    folder = distillation["folders"]["stopped"]
    shutil.copytree(folder / "dataset", tmp_path / "dataset")
    for name in ("pruned_vgg16_net.pth", "kept.state.pth"):
        shutil.copy(folder / name, tmp_path / name)
    # same path, other weights: a dense cat/dog model at the same size
    small_checkpoint(tmp_path / "vgg16Net.pth")
    proc = run_in_process(kd, "--epochs", 2, "--batch-size", 2, "--workers", 0,
                          "--resume", "kept.state.pth", cwd=tmp_path)
    assert_clean_error(proc, "kept.state.pth", "--teacher vgg16Net.pth (sha256")
    assert (tmp_path / "kept.state.pth").exists()


def test_fresh_run_refuses_to_overwrite_a_pending_interrupted_state(tmp_path):
    generate_demo(tmp_path / "photos", per_class=3)
    assert run_in_process(split_dataset, "--source", "photos", cwd=tmp_path).returncode == 0
    (tmp_path / "vgg16Net.state.pth").write_bytes(b"state of an interrupted run")
    proc = run_in_process(train, *TRAIN_FLAGS, "--epochs", 1, "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "vgg16Net.state.pth", "--resume")
    assert (tmp_path / "vgg16Net.state.pth").read_bytes() == b"state of an interrupted run"
    assert not (tmp_path / "vgg16Net.pth").exists()


def test_resume_with_other_flags_is_refused(runs, tmp_path):
    state = tmp_path / "copy.state.pth"
    torch.save(runs["state"], state)
    proc = run_in_process(train, *FLAGS[:-2], "--seed", 4, "--resume", state,
                          cwd=runs["stopped_dir"])
    assert_clean_error(proc, "--seed 3", "same flags")



def test_a_state_saved_by_an_older_version_is_refused_in_one_line(runs, tmp_path):
    """States before /2 hold Adam's moments in another memory layout than the model now."""
    old = tmp_path / "old.state.pth"
    torch.save({"format": "vgg-prune-distill-state/1"}, old)
    proc = run_in_process(train, *FLAGS, "--resume", old, cwd=runs["stopped_dir"])
    assert_clean_error(proc, str(old), "older version")
