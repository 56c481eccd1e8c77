"""Specification of compress.training.teacher_store: the teacher's logits, computed once per
picture.

A narrow VGG16 teacher (helpers.NARROW, untrained) and students pruned from it, distilled
for 2 epochs on 24 toy pictures, in this process (distillation.distil_checkpoint) and
through knowledge_distillation.py's command line.
"""
import io
import os
import signal

import pytest
import torch

from compress.checkpoints import atomic_save, load_checkpoint
from compress.cli import Interrupted
from compress.pruning.channels import Pruning, prune_checkpoint
from compress.training.distillation import distil_checkpoint
from compress.training.recipe import Recipe
from compress.training.teacher_store import MAGIC
from helpers import assert_clean_error, load_script, run_in_process, small_checkpoint, toy_pictures

pytestmark = pytest.mark.slow  # (real distillations)

RECIPE = Recipe(epochs=2, lr=1e-3, batch_size=8, workers=0)
kd = load_script("knowledge_distillation")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A teacher, two students pruned from it (0.5 and 0.7) and their pictures (the toy
    set's classes, dark and light)."""
    folder = tmp_path_factory.mktemp("store")
    toy_pictures(folder / "dataset" / "train", 12, seed=0)
    toy_pictures(folder / "dataset" / "val", 4, seed=1)
    teacher = str(small_checkpoint(folder / "teacher.pth", class_names=("dark", "light")))
    for sparsity in (0.5, 0.7):
        pruned, _ = prune_checkpoint(load_checkpoint(teacher), teacher,
                                     Pruning(sparsity=sparsity))
        atomic_save(pruned, str(folder / f"student{sparsity}.pth"))
    return folder


def distil(folder, student, output, cache=None, recipe=RECIPE, **more):
    """The student distilled from the teacher (seeded as the stages seed; `more`: more
    keywords of distil_checkpoint); (its weights, what it printed)."""
    printed = []
    teacher = str(folder / "teacher.pth")
    torch.manual_seed(recipe.seed)
    distil_checkpoint(load_checkpoint(teacher), teacher, load_checkpoint(str(folder / student)),
                      str(folder / student), data=str(folder / "dataset"),
                      output=str(folder / output), recipe=recipe, device=torch.device("cpu"),
                      teacher_cache=cache and str(folder / cache),
                      say=lambda *args, **kwargs: printed.append(" ".join(map(str, args))),
                      **more)
    weights = torch.load(folder / output, weights_only=True)["state_dict"]
    return weights, "\n".join(printed)


def teacher_ran_on(printed):
    line = [line for line in printed.splitlines() if line.startswith("The teacher ran on")][0]
    return int(line.split()[4])


def assert_same(weights, others, tolerance=1e-4):
    assert weights.keys() == others.keys()
    for name in weights:
        scale = max(weights[name].abs().max().item(), 1e-12)
        assert (weights[name] - others[name]).abs().max().item() <= tolerance * scale, name


def test_a_student_distilled_with_the_store_equals_one_distilled_without(folder):
    without, printed = distil(folder, "student0.5.pth", "without.pth")
    assert teacher_ran_on(printed) == 2 * 24  # every picture of both epochs
    first, printed = distil(folder, "student0.5.pth", "first.pth", cache="equal.pt")
    assert teacher_ran_on(printed) == 2 * 24 and (folder / "equal.pt").is_file()
    again, printed = distil(folder, "student0.5.pth", "again.pth", cache="equal.pt")
    assert teacher_ran_on(printed) == 0 and "48 of its answers read back" in printed
    for weights in (first, again):  # the same batches: the teacher's logits bit for bit
        assert_same(without, weights, tolerance=0)


def test_another_student_of_the_same_teacher_runs_no_teacher_pass_for_stored_pictures(folder):
    distil(folder, "student0.5.pth", "a.pth", cache="shared.pt")
    without, _ = distil(folder, "student0.7.pth", "b_without.pth")
    weights, printed = distil(folder, "student0.7.pth", "b.pth", cache="shared.pt")
    assert teacher_ran_on(printed) == 0
    assert_same(without, weights)
    # a third epoch: only its pictures are new
    longer = Recipe(epochs=3, lr=1e-3, batch_size=8, workers=0)
    _, printed = distil(folder, "student0.7.pth", "c.pth", cache="shared.pt", recipe=longer)
    assert teacher_ran_on(printed) == 24


@pytest.mark.parametrize("change", ["teacher", "seed", "pictures"])
def test_a_store_made_for_another_teacher_seed_or_pictures_is_refused_in_one_line(folder,
                                                                                  change):
    distil(folder, "student0.5.pth", "refused.pth", cache=f"made_{change}.pt")
    flags = ["--teacher", "teacher.pth"]
    if change == "teacher":
        other = load_checkpoint(str(folder / "teacher.pth"))
        other["state_dict"]["features.0.weight"] += 1  # (retrained, say)
        atomic_save(other, str(folder / "other_teacher.pth"))
        flags = ["--teacher", "other_teacher.pth"]
    elif change == "seed":
        flags += ["--seed", 1]
    else:
        (folder / "dataset" / "train" / "dark" / "dark_000.png").touch()  # a new time
    proc = run_in_process(kd, *flags, "--student", "student0.5.pth", "--epochs", 1,
                          "--batch-size", 8, "--workers", 0, "--output", "x.pth",
                          "--teacher-cache", f"made_{change}.pt", cwd=folder)
    named = {"teacher": "teacher_sha256", "seed": "seed", "pictures": "pictures"}[change]
    assert_clean_error(proc, f"made_{change}.pt", "another teacher or other pictures", named)
    assert not (folder / "x.pth").exists()


def test_a_store_cut_short_is_noticed_and_rebuilt_not_trusted(folder):
    distil(folder, "student0.5.pth", "whole.pth", cache="cut.pt")
    whole = (folder / "cut.pt").read_bytes()
    (folder / "cut.pt").write_bytes(whole[:len(whole) // 2])  # as a kill mid-write would
    _, printed = distil(folder, "student0.5.pth", "rebuilt.pth", cache="cut.pt")
    assert "cut.pt: cannot be read" in printed and "store rebuilt" in printed
    assert teacher_ran_on(printed) == 2 * 24
    _, printed = distil(folder, "student0.5.pth", "after.pth", cache="cut.pt")
    assert teacher_ran_on(printed) == 0  # whole again


def stored_answers(path):
    """How many (epoch, picture) answers the store at `path` holds."""
    content = path.read_bytes()
    assert content.startswith(MAGIC)
    stored = torch.load(io.BytesIO(content[len(MAGIC):]), weights_only=True)
    return sum(int(entry["filled"].sum()) for entry in stored["epochs"].values())


def test_a_distillation_stopped_by_ctrl_c_keeps_its_answers_and_resumed_finds_them(folder):
    def ctrl_c_after_epoch_1(record):  # fit stops after the next batch, in epoch 2
        if record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        distil(folder, "student0.7.pth", "stopped.pth", cache="resumed.pt",
               on_epoch=ctrl_c_after_epoch_1)
    kept = stored_answers(folder / "resumed.pt")
    assert 24 < kept < 48  # epoch 1 whole, a batch of epoch 2
    straight, _ = distil(folder, "student0.7.pth", "straight.pth")
    weights, printed = distil(folder, "student0.7.pth", "stopped.pth", cache="resumed.pt",
                              resume=str(folder / "stopped.state.pth"))
    assert teacher_ran_on(printed) == 48 - kept  # only the pictures after the stop
    assert_same(straight, weights)
    assert stored_answers(folder / "resumed.pt") == 48


@pytest.mark.parametrize("given", ["teacher.pth", "dataset"])
def test_a_teacher_cache_path_holding_something_else_is_refused_before_any_work(folder,
                                                                                 given):
    """A checkpoint given as --teacher-cache by mistake would be overwritten by the store."""
    before = sorted(path.name for path in folder.iterdir())
    teacher = (folder / "teacher.pth").read_bytes()
    proc = run_in_process(kd, "--teacher", "teacher.pth", "--student", "student0.5.pth",
                          "--epochs", 1, "--batch-size", 8, "--workers", 0, "--output", "y.pth",
                          "--teacher-cache", given, cwd=folder)
    assert_clean_error(proc, f"--teacher-cache {given}",
                       "refusing to overwrite" if given.endswith(".pth") else "cannot be read")
    assert sorted(path.name for path in folder.iterdir()) == before
    assert (folder / "teacher.pth").read_bytes() == teacher
