"""Specification of training.recipe: the optimizer, the learning-rate schedule, weight decay
and label smoothing a training run uses, and a scheduled run that resumes exactly.

The defaults are the original demo's (Adam at a constant rate, no decay, no smoothing):
no schedule is made for them, so their runs are what they always were.
"""
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import model as vgg
from compress.cli import Interrupted
from compress.training import loop, resume
from compress.training.recipe import Recipe, rate_factor
from helpers import IMAGE_SIZE, NARROW, generate_demo

CPU = torch.device("cpu")
SCHEDULED = Recipe(epochs=2, lr=1e-3, batch_size=2, seed=5, crop_scale=0.5, workers=0,
                   optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=1,
                   label_smoothing=0.1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe") / "dataset"
    generate_demo(root / "train", per_class=3)
    generate_demo(root / "val", per_class=1, seed=1)
    return root


def test_warm_up_rises_linearly_then_cosine_falls_to_zero():
    factors = [rate_factor(step, warmup=4, total=12, cosine=True) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert rate_factor(12, warmup=4, total=12, cosine=True) == pytest.approx(0.0)


def test_a_constant_rate_after_warm_up_stays_at_the_peak():
    assert [rate_factor(s, warmup=2, total=6, cosine=False) for s in range(6)] == \
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_the_demos_recipe_makes_no_schedule_and_one_adam_group():
    model = vgg.from_architecture(NARROW)
    recipe = Recipe(epochs=3, lr=1e-4)
    optimizer = recipe.make_optimizer(model)
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0
    assert recipe.make_scheduler(optimizer, steps_per_epoch=10) is None


def test_weight_decay_spares_biases_and_batch_norm():
    model = vgg.from_architecture(dict(NARROW, batch_norm=True))
    optimizer = Recipe(epochs=1, lr=1e-3, optimizer="adamw", weight_decay=0.1).make_optimizer(model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in decayed) == (parameter.ndim > 1), name


def test_sgd_has_nesterov_momentum():
    optimizer = Recipe(epochs=1, lr=0.1, optimizer="sgd").make_optimizer(
        vgg.from_architecture(NARROW))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"]


def test_own_rates_go_in_groups_of_their_own():
    model = vgg.from_architecture(dict(NARROW, batch_norm=True))
    scales = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    optimizer = Recipe(epochs=1, lr=1e-3).make_optimizer(model, {id(s): 0.5 for s in scales})
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(rates[id(s)] == 0.5 for s in scales)
    assert sum(rate == 1e-3 for rate in rates.values()) == len(rates) - len(scales)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="lion"):
        Recipe(epochs=1, lr=1e-3, optimizer="lion")


def test_resume_settings_keep_epochs_only_when_a_schedule_depends_on_them():
    assert "epochs" not in Recipe(epochs=3, lr=1e-3).resume_settings(32)
    assert SCHEDULED.resume_settings(32)["epochs"] == 2
    assert SCHEDULED.resume_settings(32)["schedule"] == "cosine"


def new_run(dataset):
    torch.manual_seed(5)
    model = vgg.from_architecture(NARROW).to(memory_format=loop.MEMORY_FORMAT)
    optimizer = SCHEDULED.make_optimizer(model)
    train_loader, val_loader = SCHEDULED.loaders(str(dataset), IMAGE_SIZE, CPU)
    return model, optimizer, SCHEDULED.make_scheduler(optimizer, len(train_loader)), \
        train_loader, val_loader


def smoothed(model, images, labels, calls=None):
    if calls is not None:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    logits = model(images)
    return F.cross_entropy(logits, labels, label_smoothing=SCHEDULED.label_smoothing), logits


def fit(folder, run, compute_loss=smoothed, resume=None):
    model, optimizer, scheduler, train_loader, val_loader = run
    return loop.fit(model, optimizer, compute_loss, train_loader, val_loader, CPU,
                    epochs=SCHEDULED.epochs, output=str(folder / "model.pth"),
                    settings=SCHEDULED.resume_settings(IMAGE_SIZE), on_best=lambda m: None,
                    title="test", resume=resume, memory_format=loop.MEMORY_FORMAT,
                    scheduler=scheduler)


@pytest.mark.slow  # (real trainings)
def test_a_scheduled_run_stopped_by_ctrl_c_resumes_to_the_same_weights_and_rates(dataset,
                                                                                  tmp_path):
    straight = new_run(dataset)
    history = fit(tmp_path, straight)
    calls = []
    stopped = new_run(dataset)
    (tmp_path / "b").mkdir()
    with pytest.raises(Interrupted):
        fit(tmp_path / "b", stopped, lambda *batch: smoothed(*batch, calls=calls))
    resumed = new_run(dataset)
    resumed_history = fit(tmp_path / "b", resumed, resume=str(tmp_path / "b" / "model.state.pth"))
    for name, tensor in straight[0].state_dict().items():
        assert torch.equal(tensor, resumed[0].state_dict()[name]), name
    assert [r["lr"] for r in resumed_history] == [r["lr"] for r in history]
    # 3 steps an epoch, 1 epoch of warm-up, cosine over the other 3 steps
    assert history[0]["lr"] == pytest.approx(1e-3)
    assert history[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_state_saved_before_the_recipe_flags_resumes_with_their_defaults(dataset, tmp_path):
    """A Ctrl-C state of an older version recorded no optimizer or schedule: with the
    defaults it resumes; with another optimizer it is refused, naming the flag."""
    run = new_run(dataset)
    model, optimizer = run[0], run[1]
    settings = {"lr": 1e-3, "batch_size": 2, "seed": 5, "crop_scale": 0.5, "cache": False,
                "image_size": IMAGE_SIZE, "amp": False}
    resume.save_training_state(str(tmp_path / "old.pth"), model, optimizer, None, CPU,
                             resume.Progress(), settings)
    now = Recipe(epochs=2, lr=1e-3, batch_size=2, seed=5, crop_scale=0.5).resume_settings(
        IMAGE_SIZE)
    resume.load_training_state(str(tmp_path / "old.pth"), model, optimizer, None, CPU, now, 2)
    other = Recipe(epochs=2, lr=1e-3, batch_size=2, seed=5, crop_scale=0.5,
                   optimizer="sgd").resume_settings(IMAGE_SIZE)
    with pytest.raises(Exception, match="--optimizer adam \\(now sgd\\)"):
        resume.load_training_state(str(tmp_path / "old.pth"), model, optimizer, None, CPU, other, 2)
