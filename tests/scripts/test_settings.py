"""Specification of settings built in one place: each settings object from the parsed flags
(cli.settings_from), the NNI trial's command from the sweep's own parser, and what a run
used saved whole and compared whole (old records read as they were meant).
"""
import dataclasses
import os
import shlex

import pytest

from compress.cli import settings_from
from compress.export.convert import ExportPlan
from compress.measure.timing import TimingPlan
from compress.sweep.candidates import SweepSetup, Teacher, comparable_training
from compress.training.distillation import Distillation
from compress.training.recipe import RECIPE_DEFAULTS, Recipe
from helpers import load_script, small_checkpoint

sweep = load_script("sweep")
train = load_script("train")
distil = load_script("knowledge_distillation")
export = load_script("export")

# a value other than the default for every flag a trial takes (paths made absolute)
EVERY_TRIAL_FLAG = ["--data", "d", "--image-size", "48", "--batch-size", "7", "--device", "cpu",
                    "--workers", "1", "--seed", "3", "--crop-scale", "0.4", "--cache", "--amp",
                    "--optimizer", "sgd", "--weight-decay", "0.1", "--schedule", "cosine",
                    "--warmup-epochs", "1", "--label-smoothing", "0.1", "--weights", "w.pth",
                    "--kd-epochs", "5", "--lr", "0.01", "--temperature", "3", "--alpha", "0.5",
                    "--kd-loss", "mse", "--feature-weight", "2", "--mix", "cutmix",
                    "--max-drop", "2", "--target", "onnx", "--output-dir", "out", "--warmup", "1",
                    "--repeats", "4", "--max-repeats", "9", "--verbose", "--concurrency", "2",
                    "--tensorboard", "board"]


def trial_flags(parser, argv):
    """The flags the trial of `argv`'s experiment is given, parsed by the same parser."""
    args = parser.parse_args(argv)
    command = shlex.split(sweep.trial_command(parser, args, concurrency=1))
    assert command[-1] == "--nni-trial"
    return args, parser.parse_args(command[2:])


def test_every_flag_the_sweep_parses_reaches_a_trial_or_is_the_experiments():
    parser = sweep.get_args_parser()
    flags = {max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    given = {word for word in EVERY_TRIAL_FLAG if word.startswith("--")}
    # a new flag of the sweep must be added above (or to EXPERIMENT_FLAGS): else this fails
    assert flags - given == sweep.EXPERIMENT_FLAGS | {"--nni-trial"}


def test_a_trial_parses_exactly_the_settings_of_the_experiments_command():
    parser = sweep.get_args_parser()
    args, trial = trial_flags(parser, EVERY_TRIAL_FLAG)
    for name, value in vars(args).items():
        if name in ("data", "weights", "output_dir", "tensorboard"):
            assert getattr(trial, name) == os.path.abspath(value)
        elif name == "concurrency":
            assert trial.concurrency == 1  # (its threads: cores / the experiment's concurrency)
        elif name == "nni_trial":
            assert trial.nni_trial
        elif f"--{name.replace('_', '-')}" not in sweep.EXPERIMENT_FLAGS:
            assert getattr(trial, name) == value, name


def test_a_trial_of_the_default_command_gets_the_defaults():
    parser = sweep.get_args_parser()
    args, trial = trial_flags(parser, [])
    # (first_epoch is no flag: a sweep's later stages set it)
    settings = {f.name for f in dataclasses.fields(Recipe)} - {"epochs", "first_epoch"}
    assert all(getattr(trial, name) == getattr(args, name) for name in settings)


def test_settings_objects_are_built_from_the_flags_of_their_names():
    args = train.get_args_parser().parse_args(["--optimizer", "adamw", "--weight-decay", "0.05",
                                               "--schedule", "cosine", "--warmup-epochs", "2",
                                               "--label-smoothing", "0.1", "--epochs", "3"])
    recipe = Recipe.from_args(args)
    assert (recipe.optimizer, recipe.weight_decay, recipe.schedule, recipe.warmup_epochs,
            recipe.label_smoothing, recipe.epochs) == ("adamw", 0.05, "cosine", 2, 0.1, 3)
    kd = distil.get_args_parser().parse_args(["--kd-loss", "mse", "--alpha", "0.5",
                                              "--feature-weight", "1"])
    assert Distillation.from_args(kd) == Distillation(alpha=0.5, kd_loss="mse",
                                                      feature_weight=1.0)
    plan = export.get_args_parser().parse_args(["--int8-for", "avx2", "--calibration", "9"])
    assert ExportPlan.from_args(plan) == ExportPlan(calibration=9, int8_for="avx2")
    timing = sweep.get_args_parser().parse_args(["--repeats", "4", "--seed", "2"])
    assert TimingPlan.from_args(timing) == TimingPlan(repeats=4, seed=2)


def test_the_sweeps_kd_epochs_are_its_stages_the_first_its_recipes_epochs(tmp_path):
    small_checkpoint(tmp_path / "dense.pth")
    for given, stages in ((["7"], (7,)), (["5", "20"], (5, 20))):
        args = sweep.get_args_parser().parse_args(["--kd-epochs", *given])
        setup = SweepSetup.from_args(args, Teacher.load(str(tmp_path / "dense.pth")))
        assert setup.recipe.epochs == stages[0] and setup.stages == stages


def test_with_no_flags_every_recipe_is_the_original_demos():
    for script, epochs in ((train, 30), (distil, 20)):
        recipe = Recipe.from_args(script.get_args_parser().parse_args([]))
        assert recipe == Recipe(epochs=epochs, lr=1e-4)
        assert (recipe.optimizer, recipe.schedule, recipe.weight_decay,
                recipe.label_smoothing, recipe.warmup_epochs) == ("adam", "constant", 0, 0, 0)
    assert Distillation.from_args(distil.get_args_parser().parse_args([])) == \
        Distillation(temperature=8.0, alpha=0.99, kd_loss="kl", feature_weight=0.0)


def test_settings_from_takes_only_fields_the_flags_name():
    @dataclasses.dataclass
    class Plan:
        seed: int = 0
        unknown: str = "kept"
    args = sweep.get_args_parser().parse_args(["--seed", "5"])
    assert settings_from(Plan, args) == Plan(seed=5, unknown="kept")


def test_an_older_sweep_row_is_compared_as_it_was_meant():
    """sweep.json rows written before the recipe flags (kd_epochs, no optimizer...) are the
    same training as today's default flags: not run again."""
    old = {"kd_epochs": 3, "lr": 1e-4, "batch_size": 32, "seed": 0, "crop_scale": 0.08,
           "data": "/d", "image_size": None, "amp": False, "cache": False,
           "teacher_sha256": "abc"}
    now = {**Recipe(epochs=3, lr=1e-4).settings(), **Distillation().settings(),
           "data": "/d", "image_size": None, "teacher_sha256": "abc"}
    assert comparable_training(old) == now
    assert comparable_training(dict(old, kd_epochs=4)) != now


@pytest.mark.parametrize("change", [{"temperature": 4.0}, {"alpha": 0.5}, {"kd_loss": "mse"},
                                    {"optimizer": "sgd"}, {"label_smoothing": 0.1}])
def test_students_distilled_differently_are_told_apart(change):
    now = {**Recipe(epochs=3, lr=1e-4).settings(), **Distillation().settings()}
    assert comparable_training(dict(now, **change)) != now


def test_recipe_defaults_are_the_original_demos():
    assert {key: RECIPE_DEFAULTS[key] for key in ("optimizer", "schedule", "weight_decay",
                                                  "warmup_epochs", "label_smoothing")} == \
        {"optimizer": "adam", "schedule": "constant", "weight_decay": 0.0,
         "warmup_epochs": 0.0, "label_smoothing": 0.0}
