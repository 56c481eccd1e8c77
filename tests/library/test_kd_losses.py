"""Specification of the distillation losses beside the original KL: MSE on the logits, and
feature distillation (the student's block outputs, through 1x1 adapters, matched to the
teacher's). Real distillations of a narrow VGG16 on toy pictures, a few seconds each.
"""
import pytest
import torch
import torch.nn.functional as F

from compress.checkpoints import atomic_save, load_checkpoint, model_from_checkpoint
from compress.pruning.channels import Pruning, prune_checkpoint
from compress.training import features
from compress.training.distillation import Distillation, distil_checkpoint, distillation_loss
from compress.training.recipe import Recipe
from helpers import (assert_clean_error, load_script, run_in_process, small_checkpoint,
                     toy_pictures)

RECIPE = Recipe(epochs=1, lr=1e-3, batch_size=8, workers=0)
STUDENT = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
TEACHER = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, -2.0]])
LABELS = torch.tensor([0, 2])


def test_mse_loss_is_alpha_mse_of_the_logits_plus_the_label_term():
    loss = distillation_loss(STUDENT, TEACHER, LABELS, temperature=8.0, alpha=0.7, kd_loss="mse")
    expected = 0.7 * F.mse_loss(STUDENT, TEACHER) + 0.3 * F.cross_entropy(STUDENT, LABELS)
    assert loss.item() == pytest.approx(expected.item())


def test_the_temperature_does_not_change_the_mse_loss():
    assert distillation_loss(STUDENT, TEACHER, LABELS, 1.0, 0.5, kd_loss="mse") == \
        distillation_loss(STUDENT, TEACHER, LABELS, 8.0, 0.5, kd_loss="mse")


def test_label_smoothing_acts_on_the_label_term_only():
    plain = distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 0.0)
    smoothed = distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 0.0, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(
        F.cross_entropy(STUDENT, LABELS, label_smoothing=0.2).item())
    assert smoothed != plain
    assert distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 1.0, label_smoothing=0.2) == \
        distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 1.0)


def test_an_unknown_loss_or_alpha_is_refused():
    with pytest.raises(ValueError, match="huber"):
        Distillation(kd_loss="huber")
    with pytest.raises(Exception, match="alpha"):
        Distillation(alpha=1.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kd_losses")
    toy_pictures(folder / "dataset" / "train", 8, seed=0)
    toy_pictures(folder / "dataset" / "val", 4, seed=1)
    teacher = str(small_checkpoint(folder / "teacher.pth", class_names=("dark", "light")))
    pruned, _ = prune_checkpoint(load_checkpoint(teacher), teacher, Pruning(sparsity=0.5))
    atomic_save(pruned, str(folder / "student.pth"))
    return folder


def distil(folder, output, distillation):
    teacher, student = str(folder / "teacher.pth"), str(folder / "student.pth")
    torch.manual_seed(0)
    history = distil_checkpoint(load_checkpoint(teacher), teacher, load_checkpoint(student),
                                student, data=str(folder / "dataset"), output=str(folder / output),
                                recipe=RECIPE, distillation=distillation,
                                device=torch.device("cpu"), say=lambda *a, **k: None)
    return history, load_checkpoint(str(folder / output))


@pytest.mark.slow  # (its fixture prunes with NNI)
def test_adapters_widen_each_student_block_to_the_teachers(folder):
    teacher = model_from_checkpoint(load_checkpoint(str(folder / "teacher.pth")), "t")
    student = model_from_checkpoint(load_checkpoint(str(folder / "student.pth")), "s")
    wrapped = features.WithAdapters(student, teacher).train()
    hints = features.Hints(teacher)
    images = torch.randn(2, 3, 32, 32)
    logits, adapted = wrapped(images)
    teacher(images)
    expected = hints.taken()
    assert logits.shape == (2, 2) and len(adapted) == len(expected) == 5
    assert [a.shape for a in adapted] == [e.shape for e in expected]
    assert wrapped.eval()(images).shape == (2, 2)  # evaluation: the logits alone


@pytest.mark.slow  # (real distillations)
def test_feature_distillation_trains_a_plain_student_that_loads_alone(folder):
    plain_history, plain = distil(folder, "plain.pth", Distillation())
    history, student = distil(folder, "features.pth", Distillation(feature_weight=1.0))
    # no adapter is saved: the checkpoint is the pruned architecture, loadable as any
    assert student["architecture"] == plain["architecture"]
    assert not any("adapter" in key for key in student["state_dict"])
    model_from_checkpoint(student, "features.pth")
    assert student["metrics"]["distillation"]["feature_weight"] == 1.0
    # the feature term changed what was learned (and the loss the history records)
    assert history[0]["train_loss"] != plain_history[0]["train_loss"]
    assert any(not torch.equal(student["state_dict"][k], plain["state_dict"][k])
               for k in plain["state_dict"])


@pytest.mark.slow  # (real distillations)
def test_mse_distillation_runs_and_is_recorded(folder):
    _, student = distil(folder, "mse.pth", Distillation(kd_loss="mse", alpha=0.5))
    assert student["metrics"]["distillation"] == {"temperature": 8.0, "alpha": 0.5,
                                                  "kd_loss": "mse", "feature_weight": 0.0}


def test_feature_distillation_of_a_mobilenet_student_is_one_line(tmp_path):
    proc = run_in_process(load_script("knowledge_distillation"), "--student-arch",
                          "mobilenet_v2", "--feature-weight", 1, cwd=tmp_path)
    assert_clean_error(proc, "--feature-weight: needs a pruned VGG student")
