"""Specification of checkpoints: every stage loads only plain tensors and data
(torch.load weights_only=True) and turns any wrong or broken file into a one-line
error naming it (exit status 2, no traceback); writes are atomic.

Most wrong-file cases run each script's real CLI edge (`run_cli`) in this process,
which is fast; a representative few run the scripts as real subprocesses.
"""
import json
import pickle
import random
from pathlib import Path

import pytest
import torch

import model as vgg
from compress import checkpoints
from compress.cli import UserError
from compress.machine.resources import DiskFull
from helpers import (IMAGE_SIZE, NARROW, CreatesFileWhenUnpickled, assert_clean_error,
                     generate_demo, load_script, run_in_process, run_script, small_checkpoint)

SCRIPTS = {name: load_script(name) for name in ("test", "pruner", "knowledge_distillation")}


def make_bad_file(kind, folder):
    """Write one kind of wrong checkpoint into `folder`; returns (path, marker or None)."""
    folder = Path(folder)
    path = folder / f"{kind}.pth"
    if kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        whole = small_checkpoint(folder / "whole.pth").read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "foreign_state_dict":  # tensors, but not of a VGG
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)}, path)
    elif kind == "pickled_module":
        torch.save(vgg.from_architecture(NARROW), path)
    elif kind == "code_on_unpickle":
        torch.save(CreatesFileWhenUnpickled(folder / "pwned"), path)
        return path, folder / "pwned"
    elif kind == "raw_pickle_code":
        path.write_bytes(pickle.dumps(CreatesFileWhenUnpickled(folder / "pwned"), protocol=2))
        return path, folder / "pwned"
    else:
        raise ValueError(kind)
    return path, None


BAD_FILES = ["missing", "empty", "truncated", "random_bytes", "foreign_state_dict",
             "pickled_module", "code_on_unpickle", "raw_pickle_code"]
REASONS = {"missing": "not found", "empty": "empty", "truncated": "corrupt",
           "random_bytes": "", "foreign_state_dict": "not of a VGG",
           "pickled_module": "pickled Python objects", "code_on_unpickle": "refused",
           "raw_pickle_code": "refused"}


def test_crafted_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    """The control for the tests below: this file is dangerous with weights_only=False."""
    path, marker = make_bad_file("code_on_unpickle", tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_checkpoint_refuses_wrong_files_with_a_user_error(tmp_path, kind):
    path, marker = make_bad_file(kind, tmp_path)
    with pytest.raises(UserError) as error:
        checkpoints.load_checkpoint(str(path))
    message = str(error.value)
    assert str(path) in message and REASONS[kind] in message
    assert "\n" not in message
    if marker:
        assert not marker.exists(), "unpickling ran code"


ENTRY_POINTS = [("test", "--weights"), ("pruner", "--weights"),
                ("knowledge_distillation", "--teacher"), ("knowledge_distillation", "--student")]


@pytest.mark.parametrize("script, flag", ENTRY_POINTS, ids=[" ".join(e) for e in ENTRY_POINTS])
@pytest.mark.parametrize("kind", BAD_FILES)
def test_every_stage_turns_a_wrong_checkpoint_into_a_one_line_error(tmp_path, kind, script,
                                                                    flag):
    path, marker = make_bad_file(kind, tmp_path)
    args = [flag, path]
    if flag == "--student":
        args += ["--teacher", small_checkpoint(tmp_path / "teacher.pth")]
    if flag == "--teacher":
        args += ["--student", small_checkpoint(tmp_path / "student.pth", kind="pruned")]
    proc = run_in_process(SCRIPTS[script], *args, cwd=tmp_path)
    assert_clean_error(proc, path, REASONS[kind])
    if marker:
        assert not marker.exists(), "unpickling ran code"


# Garbage that torch's weights-only unpickler chokes on with other exception types than
# the ones checkpoints.safe_load catches (found by feeding it seeded random bytes: about 1 file
# in 12 of them escaped as IndexError, KeyError or struct.error).
GARBAGE = {"struct_error": b"M\x1a", "index_error": b"\x80\x02\x86.",
           "key_error": b"\x80\x02h\x05."}
@pytest.mark.parametrize("kind", GARBAGE)
def test_load_checkpoint_refuses_garbage_that_confuses_the_unpickler(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    path.write_bytes(GARBAGE[kind])
    with pytest.raises(UserError, match="corrupt|refused"):
        checkpoints.load_checkpoint(str(path))


def test_test_py_reports_a_garbage_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(GARBAGE["index_error"])
    proc = run_in_process(SCRIPTS["test"], "--weights", path, cwd=tmp_path)
    assert_clean_error(proc, path)


def test_pruner_refuses_a_whole_pickled_module(tmp_path):
    path, _ = make_bad_file("pickled_module", tmp_path)
    proc = run_in_process(SCRIPTS["pruner"], "--weights", path.name, cwd=tmp_path)
    assert_clean_error(proc, path.name, "nn.Module")


def test_distillation_refuses_a_truncated_teacher(tmp_path):
    path, _ = make_bad_file("truncated", tmp_path)
    small_checkpoint(tmp_path / "pruned_vgg16_net.pth", kind="pruned")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", path.name, cwd=tmp_path)
    assert_clean_error(proc, path.name, "truncated or corrupt")


# --- the same through real subprocesses, a representative few ----------------

def test_test_py_reports_a_missing_checkpoint_in_one_line(tmp_path):
    proc = run_script("test.py", "--weights", "nowhere.pth", cwd=tmp_path)
    assert_clean_error(proc, "nowhere.pth", "not found")


def test_pruner_refuses_a_crafted_pickle_without_running_it(tmp_path):
    path, marker = make_bad_file("code_on_unpickle", tmp_path)
    proc = run_script("pruner.py", "--weights", path.name, cwd=tmp_path)
    assert_clean_error(proc, path.name, "weights_only=True")
    assert not marker.exists()
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


# --- right file, wrong stage ----------------------------------------------------

def test_dense_checkpoint_as_student_is_refused(pipeline, tmp_path):
    dense = pipeline.path("vgg16Net.pth")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", dense, "--student",
                          dense, "--data", pipeline.path("dataset"), cwd=tmp_path)
    message = assert_clean_error(proc, dense, "dense checkpoint")
    assert "pruned or finetuned" in message
    assert list(tmp_path.iterdir()) == []


def test_pruned_checkpoint_as_teacher_is_refused(pipeline, tmp_path):
    pruned = pipeline.path("pruned_vgg16_net.pth")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", pruned, "--student",
                          pruned, "--data", pipeline.path("dataset"), cwd=tmp_path)
    assert_clean_error(proc, pruned, "pruned checkpoint", "dense")


@pytest.mark.parametrize("kind", ["pruned", "finetuned"])
def test_pruner_refuses_an_already_pruned_checkpoint(tmp_path, kind):
    path = small_checkpoint(tmp_path / f"{kind}.pth", kind=kind)
    proc = run_in_process(SCRIPTS["pruner"], "--weights", path, cwd=tmp_path)
    assert_clean_error(proc, path, f"is a {kind} checkpoint", "dense")
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


def test_pruner_cli_refuses_an_already_pruned_checkpoint(pipeline, tmp_path):
    pruned = pipeline.path("pruned_vgg16_net.pth")
    proc = run_in_process(SCRIPTS["pruner"], "--weights", pruned, cwd=tmp_path)
    assert_clean_error(proc, pruned, "pruned checkpoint")


def test_checkpoint_of_other_classes_than_the_data_is_refused(pipeline, tmp_path):
    path = small_checkpoint(tmp_path / "birds.pth", class_names=("bird", "fish"))
    data = pipeline.path("dataset")
    proc = run_in_process(SCRIPTS["test"], "--weights", path, "--data", data, "--workers", 0,
                          cwd=tmp_path)
    assert_clean_error(proc, data / "val", "['bird', 'fish']", "['cat', 'dog']")
    student = small_checkpoint(tmp_path / "p.pth", kind="pruned", class_names=("bird", "fish"))
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", path,
                          "--student", student, "--data", data, "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, path, data / "train", "['bird', 'fish']", "['cat', 'dog']")
    assert not list(tmp_path.glob("*.png"))


def test_distillation_refuses_a_student_of_other_classes_than_its_teacher(tmp_path):
    teacher = small_checkpoint(tmp_path / "t.pth")
    student = small_checkpoint(tmp_path / "s.pth", kind="pruned", class_names=("bird", "fish"))
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", teacher,
                          "--student", student, cwd=tmp_path)
    assert_clean_error(proc, "s.pth: made for classes ['bird', 'fish']", "the teacher",
                       "['cat', 'dog']")


def test_image_size_other_than_the_checkpoints_is_refused(pipeline, tmp_path):
    proc = run_in_process(SCRIPTS["test"], "--weights", pipeline.path("vgg16Net.pth"),
                          "--image-size", 64, "--data", pipeline.path("dataset"), cwd=tmp_path)
    assert_clean_error(proc, pipeline.path("vgg16Net.pth"), "32 px", "--image-size asks for 64 px")


def test_distillation_refuses_an_image_size_other_than_the_checkpoints(tmp_path):
    teacher = small_checkpoint(tmp_path / "t.pth")
    student = small_checkpoint(tmp_path / "s.pth", kind="pruned")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", teacher,
                          "--student", student, "--image-size", 64, cwd=tmp_path)
    assert_clean_error(proc, "32 px", "64 px")


def test_distillation_refuses_a_teacher_made_for_another_image_size_than_the_student(tmp_path):
    teacher = small_checkpoint(tmp_path / "t.pth", image_size=64)
    student = small_checkpoint(tmp_path / "s.pth", kind="pruned")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", teacher,
                          "--student", student, cwd=tmp_path)
    assert_clean_error(proc, "t.pth: made for 64 px", "the student", "asks for 32 px")


# --- what the pipeline writes -----------------------------------------------------

@pytest.mark.parametrize("name, kind", [("vgg16Net.pth", "dense"),
                                        ("pruned_vgg16_net.pth", "pruned"),
                                        ("finetuned_vgg16_net.pth", "finetuned")])
def test_pipeline_checkpoints_load_without_pickle(pipeline, name, kind):
    checkpoint = torch.load(pipeline.path(name), map_location="cpu", weights_only=True)
    assert checkpoint["format"] == checkpoints.CHECKPOINT_FORMAT and checkpoint["kind"] == kind
    assert checkpoint["class_names"] == ["cat", "dog"]
    assert checkpoint["image_size"] == IMAGE_SIZE
    assert (checkpoint["architecture"]["features"] == vgg.CONV_WIDTHS["vgg16"]) == (kind == "dense")
    model = vgg.from_architecture(checkpoint["architecture"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert all(v.device.type == "cpu" for v in checkpoint["state_dict"].values())
    assert not list(pipeline.root.glob(".*.tmp"))


def test_atomic_save_writes_a_loadable_file_and_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pth"
    checkpoints.atomic_save({"a": torch.arange(5)}, str(target))
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_save_replaces_the_old_file_whole(tmp_path):
    target = tmp_path / "ckpt.pth"
    checkpoints.atomic_save({"big": torch.zeros(100_000)}, str(target))
    checkpoints.atomic_save({"small": torch.ones(3)}, str(target))
    assert list(torch.load(target, weights_only=True)) == ["small"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["failed", "interrupted"])
def test_a_failed_or_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch,
                                                                       failure):
    target = tmp_path / "ckpt.pth"
    checkpoints.atomic_save({"weights": torch.arange(10)}, str(target))
    before = target.read_bytes()

    def dies_midway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise failure

    monkeypatch.setattr(torch, "save", dies_midway)
    # a full disk is said as one (naming the file and what is kept); Ctrl-C stays itself
    expected = (DiskFull, "the disk is full.*the file there is as it was") \
        if isinstance(failure, OSError) else (KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]):
        checkpoints.atomic_save({"weights": torch.arange(99)}, str(target))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_write_json_writes_the_whole_report_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    checkpoints.write_json([{"name": "dense", "accuracy": 0.5}] * 1000, str(target))
    checkpoints.write_json([{"name": "pruned"}], str(target))
    assert json.loads(target.read_text()) == [{"name": "pruned"}]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_json_failing_midway_leaves_the_previous_report_intact(tmp_path):
    target = tmp_path / "history.json"
    checkpoints.write_json([{"epoch": 1}], str(target))
    before = target.read_bytes()
    with pytest.raises(TypeError):  # json.dump has written part of it when it meets this
        checkpoints.write_json([{"epoch": 1}] * 1000 + [{"epoch": object()}], str(target))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


# --- what the pipeline may overwrite ------------------------------------------------

def test_pruner_refuses_to_overwrite_a_file_that_is_not_its_checkpoint_but_replaces_its_own(
        tmp_path):
    weights = small_checkpoint(tmp_path / "dense.pth")
    output = tmp_path / "pruned_vgg16_net.pth"
    torch.save(vgg.from_architecture(NARROW), output)  # the original demo's whole module
    before = output.read_bytes()
    proc = run_in_process(SCRIPTS["pruner"], "--weights", weights, cwd=tmp_path)
    assert_clean_error(proc, "pruned_vgg16_net.pth", "refusing to overwrite", "--output")
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pth", "pruned_vgg16_net.pth"]

    small_checkpoint(output, kind="pruned")  # one of ours: a re-run replaces it
    proc = run_in_process(SCRIPTS["pruner"], "--weights", weights, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert torch.load(output, weights_only=True)["metrics"]["dense_weights"] == str(weights)


def test_training_refuses_to_overwrite_the_originals_bare_state_dict_before_any_work(tmp_path):
    for part in ("train", "val"):
        generate_demo(tmp_path / "dataset" / part, per_class=2)
    torch.save(vgg.from_architecture(NARROW).state_dict(), tmp_path / "vgg16Net.pth")
    proc = run_in_process(load_script("train"), "--epochs", 1, "--image-size", IMAGE_SIZE,
                          cwd=tmp_path)
    assert_clean_error(proc, "vgg16Net.pth", "refusing to overwrite", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "vgg16Net.pth"]


def test_a_checkpoint_written_before_normalisation_was_recorded_loads_as_the_originals(
        tmp_path):
    path = small_checkpoint(tmp_path / "old.pth")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["normalization"]
    torch.save(checkpoint, path)
    assert checkpoints.load_checkpoint(str(path))["normalization"] == {"mean": [0.5] * 3,
                                                                       "std": [0.5] * 3}


def test_distillation_refuses_a_teacher_normalised_otherwise_than_the_student(tmp_path):
    teacher = small_checkpoint(tmp_path / "t.pth")
    checkpoint = torch.load(teacher, weights_only=True)
    checkpoint["normalization"] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.save(checkpoint, teacher)
    student = small_checkpoint(tmp_path / "s.pth", kind="pruned")
    proc = run_in_process(SCRIPTS["knowledge_distillation"], "--teacher", teacher,
                          "--student", student, cwd=tmp_path)
    assert_clean_error(proc, "t.pth: made for pictures normalised with", "0.485",
                       "the student", "0.5")
