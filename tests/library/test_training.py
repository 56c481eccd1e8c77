"""Specification of training.py, called in this process as a notebook would call it:

- `train_one_epoch()` runs alone and returns named totals;
- Ctrl-C (a real SIGINT, sent from inside a chosen batch) saves a state from which
  `fit(resume=...)` ends with the very weights of a run never stopped;
- a second Ctrl-C aborts without saving;
- `load_training_state()` refuses, in one line each, a state that would not
  continue the run exactly.

The model is model.py's VGG16 built from narrow widths (helpers.NARROW), on 6
training and 2 validation pictures of 32 px: 3 batches of 2 an epoch.
"""
import copy
import json
import os
import re
import signal
import types

import pytest
import torch
import torch.nn.functional as F

import model as vgg
from compress.cli import Interrupted, UserError
from compress.data.images import training_loaders
from compress.training import loop, resume
from helpers import IMAGE_SIZE, NARROW, generate_demo

CPU = torch.device("cpu")
SETTINGS = {"lr": 1e-3, "batch_size": 2, "seed": 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("training") / "dataset"
    generate_demo(root / "train", per_class=3)
    generate_demo(root / "val", per_class=1, seed=1)
    return root


def new_run(dataset):
    """(model, optimizer, train loader, val loader), the same every time."""
    torch.manual_seed(SETTINGS["seed"])
    model = vgg.from_architecture(NARROW).to(memory_format=loop.MEMORY_FORMAT)
    optimizer = torch.optim.Adam(model.parameters(), lr=SETTINGS["lr"], fused=True)
    return (model, optimizer, *training_loaders(str(dataset), IMAGE_SIZE, CPU, crop_scale=0.5,
                                                seed=SETTINGS["seed"],
                                                batch_size=SETTINGS["batch_size"], workers=0))


def cross_entropy(model, images, labels):
    logits = model(images)
    return F.cross_entropy(logits, labels), logits


def ctrl_c_in_batch(number, presses=1):
    """A loss that, in its `number`-th call (from 1), presses Ctrl-C `presses` times."""
    calls = []

    def compute_loss(model, images, labels):
        calls.append(1)
        if len(calls) == number:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return cross_entropy(model, images, labels)
    return compute_loss


def fit(folder, run, compute_loss=cross_entropy, resume=None):
    """training.fit for 2 epochs; returns (history, the metrics of each new best)."""
    model, optimizer, train_loader, val_loader = run
    bests = []
    history = loop.fit(model, optimizer, compute_loss, train_loader, val_loader, CPU,
                           epochs=2, output=str(folder / "model.pth"), settings=SETTINGS,
                           on_best=bests.append, title="test", resume=resume,
                           memory_format=loop.MEMORY_FORMAT)
    return history, bests


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in records]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """A run never stopped, and one stopped by Ctrl-C in batch 2 of epoch 1, then resumed."""
    straight_dir, stopped_dir = (tmp_path_factory.mktemp(name) for name in ("straight", "stopped"))
    straight = new_run(dataset)
    history, bests = fit(straight_dir, straight)

    stopped = new_run(dataset)
    with pytest.raises(Interrupted, match="after 4 images of epoch 1"):
        fit(stopped_dir, stopped, ctrl_c_in_batch(2))
    state_path = stopped_dir / "model.state.pth"
    state = torch.load(state_path, weights_only=True)

    resumed = new_run(dataset)  # fresh weights: the state must bring back the stopped ones
    resumed_history, resumed_bests = fit(stopped_dir, resumed, resume=str(state_path))
    return types.SimpleNamespace(
        straight=straight[0], history=history, bests=bests, state=state,
        state_left=state_path.exists(), resumed=resumed[0], resumed_history=resumed_history,
        resumed_bests=resumed_bests, stopped_dir=stopped_dir)


def test_train_one_epoch_runs_alone_and_returns_named_totals(dataset):
    model, optimizer, train_loader, _ = new_run(dataset)
    before = copy.deepcopy(model.state_dict())
    totals = loop.train_one_epoch(model, optimizer, cross_entropy, train_loader, CPU)
    assert totals.images == 6 and 0 <= totals.correct <= 6 and totals.loss > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ctrl_c_saves_where_the_epoch_stopped(runs):
    assert runs.state["format"] == resume.TRAINING_STATE_FORMAT
    assert runs.state["epoch"] == 0 and runs.state["samples_done"] == 4
    assert runs.state["sums"][2] == 4 and runs.state["history"] == []
    assert runs.state["settings"] == SETTINGS


def test_resumed_run_ends_with_the_same_weights_as_a_run_never_stopped(runs):
    straight, resumed = runs.straight.state_dict(), runs.resumed.state_dict()
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    assert without_timing(runs.resumed_history) == without_timing(runs.history)
    # stopped in epoch 1: every best was chosen after the resume
    assert without_timing(runs.resumed_bests) == without_timing(runs.bests)
    assert not runs.state_left
    history = json.loads((runs.stopped_dir / "model.history.json").read_text())
    assert without_timing(history) == without_timing(runs.history)


def test_a_run_stopped_twice_in_one_epoch_under_torchrun_resumes_to_the_same_end(
        runs, dataset, tmp_path, monkeypatch):
    """Sums added up over processes come back as floats: the image counts in the state must
    stay whole numbers, or the second resume cannot skip the images already trained."""
    monkeypatch.setattr(loop, "all_reduce_sum",
                        lambda values, device: [float(value) for value in values])
    state = str(tmp_path / "model.state.pth")
    with pytest.raises(Interrupted, match="after 4 images of epoch 1"):
        fit(tmp_path, new_run(dataset), ctrl_c_in_batch(2))
    with pytest.raises(Interrupted, match="after 6 images of epoch 1"):
        fit(tmp_path, new_run(dataset), ctrl_c_in_batch(1), resume=state)
    resumed = new_run(dataset)
    history, _ = fit(tmp_path, resumed, resume=state)
    assert history[0]["images_per_second"] is None  # nothing of epoch 1 was left to train
    assert without_timing(history) == without_timing(runs.history)
    for name, tensor in runs.straight.state_dict().items():
        assert torch.equal(tensor, resumed[0].state_dict()[name]), name


def test_a_second_ctrl_c_aborts_without_saving(dataset, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, new_run(dataset), ctrl_c_in_batch(2, presses=2))
    assert not (tmp_path / "model.state.pth").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the stage's handler is gone again


def state_with(runs, tmp_path, **changes):
    """A copy of the saved state with some entries changed, written to a file."""
    path = tmp_path / "changed.state.pth"
    torch.save(dict(runs.state, **changes), path)
    return path


def a_checkpoint(runs, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"format": "vgg-prune-distill/1", "kind": "dense"}, path)
    return path


REFUSALS = {  # how the state file is made, fit's arguments changed, the reason given
    "not a state": (a_checkpoint, {}, "not a training state"),
    "older format": (lambda runs, tmp: state_with(runs, tmp, format="vgg-prune-distill-state/1"),
                     {}, "older version"),
    "other process count": (lambda runs, tmp: state_with(runs, tmp, world=2), {},
                            "saved by 2 process(es), resumed by 1"),
    "other flags": (lambda runs, tmp: state_with(runs, tmp), {"settings": dict(SETTINGS, lr=0.01)},
                    "was saved with --lr 0.001 (now 0.01)"),
    "setting not recorded": (lambda runs, tmp: state_with(runs, tmp),
                             {"settings": dict(SETTINGS, temperature=8.0)},
                             "did not record --temperature"),
    "setting no longer given": (lambda runs, tmp: state_with(
        runs, tmp, settings=dict(SETTINGS, pretrained="imagenet")), {},
        "was saved with --pretrained imagenet (now not given)"),
    "epochs already done": (lambda runs, tmp: state_with(runs, tmp, epoch=2), {},
                            "stopped in epoch 3, but --epochs is 2"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_load_training_state_refuses_what_would_not_continue_exactly(runs, dataset, tmp_path,
                                                                     case):
    make_path, overrides, reason = REFUSALS[case]
    model, optimizer, _, _ = new_run(dataset)
    before = copy.deepcopy(model.state_dict())
    arguments = {"settings": SETTINGS, "epochs": 2, **overrides}
    with pytest.raises(UserError, match=re.escape(reason)) as error:
        resume.load_training_state(str(make_path(runs, tmp_path)), model, optimizer, None, CPU,
                                     **arguments)
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_load_training_state_refuses_a_state_of_another_model(runs, tmp_path):
    other = vgg.from_architecture(dict(NARROW, classifier=[32, 32]))
    optimizer = torch.optim.Adam(other.parameters())
    with pytest.raises(UserError, match="saved for a different model"):
        resume.load_training_state(str(state_with(runs, tmp_path)), other, optimizer, None, CPU,
                                     SETTINGS, epochs=2)
