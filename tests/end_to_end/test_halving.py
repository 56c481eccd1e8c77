"""Specification of what a sweep does beyond one pass of every setting: successive halving
(sweep.py --kd-epochs 1 1), a decision that always ships something, picking again from a
finished sweep (--pick-again), and function matching (--mix: the teacher answers the very
mixed picture the student sees)."""
import json
import shutil
import types

import pytest
import torch

from compress.cli import Interrupted
from compress.data.images import training_loaders
from compress.sweep import decision, halving, plain, rules
from compress.training import distillation
from compress.training.recipe import Recipe
from helpers import IMAGE_SIZE, generate_demo, load_script, run_in_process

sweep = load_script("sweep")
QUICK = ["--methods", "l1", "--batch-size", 8, "--workers", 0, "--max-repeats", 3,
         "--repeats", 2, "--target", "pytorch"]


def standing(difference, high, flops):
    return {"vs_dense": {"difference": difference, "low": difference - 0.05, "high": high},
            "flops": flops}


# --- which settings continue ------------------------------------------------------------

def test_the_cheapest_half_of_those_that_can_still_make_the_budget_continue():
    standings = {"l1-0.5": standing(-0.00, 0.02, 400), "l1-0.7": standing(-0.02, 0.01, 200),
                 "l1-0.8": standing(-0.04, -0.005, 100), "l1-0.9": standing(-0.12, -0.06, 50)}
    # a 1-point budget: 0.9's interval stops at -6, out of reach; of the other three, the
    # two cheapest (half of four) continue
    assert rules.survivors(standings, max_drop=1) == ["l1-0.8", "l1-0.7"]
    assert rules.survivors(standings, max_drop=10) == ["l1-0.9", "l1-0.8"]


def test_when_none_can_make_the_budget_yet_the_most_accurate_half_continues():
    """(After a short stage every student is still far below the dense model.)"""
    standings = {"a": standing(-0.10, -0.05, 10), "b": standing(-0.08, -0.04, 20),
                 "c": standing(-0.20, -0.10, 5)}
    assert rules.survivors(standings, max_drop=1) == ["b", "a"]


def test_one_within_reach_continues_with_the_most_accurate_beside_it():
    standings = {"l1-0.7": standing(-0.03, -0.01, 200), "l1-0.8": standing(-0.05, -0.02, 100),
                 "l1-0.9": standing(-0.04, 0.00, 50), "l1-0.95": standing(-0.3, -0.2, 10)}
    # 0.8 is beaten by 0.9 (more accurate, cheaper); 0.9 reaches the 1-point budget
    assert rules.survivors(standings, max_drop=1) == ["l1-0.9", "l1-0.7"]


def test_a_setting_another_beats_in_accuracy_and_cost_never_continues():
    standings = {"l1-0.8": standing(-0.11, -0.08, 100), "l1-0.85": standing(-0.09, -0.06, 60),
                 "l1-0.7": standing(-0.08, -0.05, 200), "l1-0.9": standing(-0.20, -0.16, 30)}
    assert rules.survivors(standings, max_drop=1) == ["l1-0.7", "l1-0.85"]
    assert "l1-0.8" not in rules.survivors(standings, max_drop=None)


def test_without_a_budget_the_more_accurate_half_of_the_front_continues():
    standings = {"a": standing(-0.10, 0, 10), "b": standing(-0.02, 0, 20),
                 "c": standing(-0.05, 0, 5)}
    assert rules.survivors(standings, max_drop=None) == ["b", "c"]


def test_a_stage_continues_the_pictures_where_the_stage_before_stopped():
    recipe = Recipe(epochs=5, lr=1e-3)
    assert halving.stage_recipe(recipe, [5, 20, 10], 0) == recipe
    later = halving.stage_recipe(recipe, [5, 20, 10], 2)
    assert (later.epochs, later.first_epoch, later.lr) == (10, 25, 1e-3)


# --- a halving sweep --------------------------------------------------------------------

@pytest.fixture(scope="module")
def halved(narrow_teacher, tmp_path_factory):
    """A sweep of three sparsities, 1 epoch each, then 1 more for two of them (the two
    cheapest: the untrained teacher's students tie, so which continue is set here; the
    rule has its own tests above); stopped by Ctrl-C as the second of them starts its
    second stage, then run again to its end."""
    folder = tmp_path_factory.mktemp("halving")
    shutil.copytree(narrow_teacher / "dataset", folder / "dataset")
    shutil.copy2(narrow_teacher / "vgg16Net.pth", folder / "vgg16Net.pth")
    flags = [*QUICK, "--sparsities", 0.5, 0.8, 0.9, "--kd-epochs", 1, 1, "--max-drop", 100]
    continued, real = [], halving.continue_setting

    def stopped_at_the_second(setup, student, stages, stage):
        continued.append(student)
        if len(continued) == 2:
            raise Interrupted("stopped by the test")
        return real(setup, student, stages, stage)

    def two_cheapest(standings, max_drop):
        return sorted(standings, key=lambda name: standings[name]["flops"])[:2]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plain, "survivors", two_cheapest)
        patch.setattr(plain, "continue_setting", stopped_at_the_second)
        first = run_in_process(sweep, *flags, cwd=folder)
        patch.setattr(plain, "continue_setting", real)
        again = run_in_process(sweep, *flags, cwd=folder)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = json.loads((folder / "sweep" / "sweep.json").read_text())
    return types.SimpleNamespace(folder=folder, first=first, again=again, continued=continued,
                                 rows={row["name"]: row for row in rows})


@pytest.mark.slow
def test_the_settings_kept_continue_and_the_third_stops(halved):
    rows = halved.rows
    assert [stage["epochs"] for stage in rows["l1-0.9"]["stages"]] == [1, 1]
    assert [stage["epochs"] for stage in rows["l1-0.8"]["stages"]] == [1, 1]
    assert [stage["epochs"] for stage in rows["l1-0.5"]["stages"]] == [1]
    assert rows["l1-0.5"]["stages"][0]["continued"] is False
    assert rows["l1-0.9"]["epochs"] == 2 and rows["l1-0.5"]["epochs"] == 1
    sweep_folder = halved.folder / "sweep"
    assert (sweep_folder / "l1-0.9.stage1.pth").is_file()
    assert not (sweep_folder / "l1-0.5.stage1.pth").exists()
    assert "1+1" in halved.again.stdout  # the table shows each setting's epochs


@pytest.mark.slow
def test_a_halving_sweep_stopped_between_stages_continues_where_it_stopped(halved):
    assert halved.first.returncode == 130
    assert "Stopped while distilling l1-0.8 (stage 2)" in halved.first.stderr
    assert [path.rsplit("/", 1)[-1] for path in halved.continued] == ["l1-0.9.pth", "l1-0.8.pth"]
    again = halved.again.stdout
    assert again.count("done before") == 3  # no first stage ran again
    assert "=== l1-0.8 (stage 2 of 2" in again and "=== l1-0.9 (stage 2" not in again


@pytest.mark.slow
def test_the_second_stage_reads_the_teachers_answers_of_the_epochs_after_the_first(halved):
    stores = list((halved.folder / "sweep").glob("teacher_logits.*.pt"))
    assert len(stores) == 1
    content = stores[0].read_bytes()
    stored = torch.load(__import__("io").BytesIO(content[content.index(b"\n") + 1:]),
                        weights_only=True)
    assert sorted(stored["epochs"]) == ["0", "1"]  # stage 2 of both: epoch 1, once


# --- the decision, and deciding again -----------------------------------------------------

def measured(name, latency, difference, high):
    return {"name": name, "latency_ms": latency, "params": 10, "accuracy": 0.8 + difference,
            "budget": {"difference": difference, "low": difference - 0.03, "high": high}}


def test_with_no_row_in_the_budget_the_fastest_whose_interval_reaches_it_ships():
    rows = [measured("slow", 5, -0.015, 0.01), measured("fast", 1, -0.04, -0.015),
            measured("mid", 2, -0.02, 0.002)]
    chosen = decision.decide(rows, {"accuracy": 0.8}, max_drop=1)
    assert chosen["picked"] is None
    assert chosen["fastest_in_noise"]["name"] == "mid" and chosen["shipped"]["name"] == "mid"
    assert chosen["most_accurate"]["name"] == "slow"


def test_with_no_interval_reaching_the_budget_the_most_accurate_ships():
    rows = [measured("a", 1, -0.10, -0.05), measured("b", 2, -0.06, -0.02)]
    chosen = decision.decide(rows, {"accuracy": 0.8}, max_drop=1)
    assert chosen["fastest_in_noise"] is None and chosen["shipped"]["name"] == "b"


@pytest.mark.slow
def test_pick_again_decides_from_the_stored_sweep_in_another_budget_without_distilling(halved):
    folder = halved.folder
    students = {path.name: path.stat().st_mtime_ns for path in (folder / "sweep").glob("*.pth")}
    proc = run_in_process(sweep, "--pick-again", "--max-drop", 0, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "Distilling" not in proc.stdout and "Measuring" not in proc.stdout
    rows = json.loads((folder / "sweep" / "sweep.json").read_text())
    shipped = [row for row in rows if row.get("shipped")]
    assert len(shipped) == 1
    assert students == {path.name: path.stat().st_mtime_ns
                        for path in (folder / "sweep").glob("*.pth")}
    refused = run_in_process(sweep, "--pick-again", "--max-drop", 1, "--target", "int8",
                             cwd=folder)
    assert refused.returncode == 2 and "measured PyTorch" in refused.stderr


def test_pick_again_needs_a_finished_sweep_and_a_budget(tmp_path):
    proc = run_in_process(sweep, "--pick-again", "--max-drop", 1, cwd=tmp_path)
    assert proc.returncode == 2 and "not the report of a finished sweep" in proc.stderr
    proc = run_in_process(sweep, "--pick-again", cwd=tmp_path)
    assert proc.returncode == 2 and "needs --max-drop" in proc.stderr


# --- function matching -------------------------------------------------------------------

@pytest.fixture
def split(tmp_path):
    generate_demo(tmp_path / "photos", per_class=6)
    assert run_in_process(load_script("split_dataset"), "--source", "photos",
                          cwd=tmp_path).returncode == 0
    return str(tmp_path / "dataset")


class Recorder(torch.nn.Module):
    """A tiny model that keeps every batch it is shown."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 2)
        self.seen = []

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.linear(images.flatten(1))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_with_mix_the_teacher_answers_exactly_the_mixed_pictures_the_student_sees(split, mix,
                                                                                    tmp_path):
    recipe = Recipe(epochs=1, lr=1e-3, batch_size=4, mix=mix, workers=0)
    loaders = recipe.loaders(split, IMAGE_SIZE, torch.device("cpu"))
    teacher, student = Recorder(), Recorder()
    distillation.distil(teacher.eval(), student, loaders, torch.device("cpu"), recipe=recipe,
                        output=str(tmp_path / "student.pth"), settings={},
                        save_best=lambda metrics: None)
    validated = len(student.seen) - len(teacher.seen)  # (the student is also validated)
    assert len(teacher.seen) == len(loaders[0]) and validated == len(loaders[1])
    for taught, learned in zip(teacher.seen, student.seen):
        assert torch.equal(taught, learned)
    plain_loaders = Recipe(epochs=1, lr=1e-3, batch_size=4, workers=0).loaders(
        split, IMAGE_SIZE, torch.device("cpu"))
    plain_loaders[0].sampler.set_epoch(0)
    unmixed = next(iter(plain_loaders[0]))[0]
    assert not torch.equal(unmixed, teacher.seen[0])  # the pictures were mixed


def test_a_mixed_picture_is_drawn_from_its_key_alone_and_labelled_by_its_shares(split):
    first, _ = training_loaders(split, IMAGE_SIZE, torch.device("cpu"), batch_size=4,
                                mix="mixup", first_epoch=2)
    again, _ = training_loaders(split, IMAGE_SIZE, torch.device("cpu"), batch_size=4,
                                mix="mixup")
    first.sampler.set_epoch(0)
    again.sampler.set_epoch(2)
    (images, labels, keys, mixes), (images_again, *_) = next(iter(first)), next(iter(again))
    assert torch.equal(images, images_again) and (keys[:, 0] == 2).all()
    assert ((mixes[:, 1] >= 0.5) & (mixes[:, 1] <= 1)).all()
    targets = distillation.mixed_targets(labels, mixes, 2)
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))
    assert (targets.argmax(1) == labels).all()
