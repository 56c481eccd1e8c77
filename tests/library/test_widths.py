"""Specification of pruning to given widths (pruning.channels.prune(widths=...)) and of
iterative pruning's plan (sweep.stepwise): exact per-layer widths, the same network as a
uniform one-shot cut when the widths are the same, and steps that end on those widths.
"""
import copy

import pytest
import torch

import model as vgg
from compress.cli import UserError
from compress.pruning import channels
from compress.sweep.stepwise import step_epochs, step_widths

SIZE = 32


@pytest.fixture(scope="module")
def dense():
    """A narrow VGG16 with batch norm (an eighth of the widths: NNI's speedup is quick)."""
    torch.manual_seed(0)
    features = [w if w == "M" else w // 8 for w in vgg.CONV_WIDTHS["vgg16"]]
    return vgg.from_architecture({"arch": "vgg16", "batch_norm": True, "num_classes": 3,
                                  "features": features, "classifier": [32, 32]}).eval()


def test_uniform_widths_count_as_nni_does():
    assert channels.uniform_widths({"a": 64, "b": 512, "c": 5}, 0.7) == \
        {"a": 64 - 44, "b": 512 - 358, "c": 5 - 3}


@pytest.mark.parametrize("method", ["l1", "slim"])
def test_pruning_to_the_uniform_widths_is_the_uniform_cut(dense, method):
    one_shot, given = copy.deepcopy(dense), copy.deepcopy(dense)
    channels.prune(one_shot, 0.7, SIZE, method)
    channels.prune(given, 0.0, SIZE, method,
                   widths=channels.uniform_widths(channels.prunable_layers(dense), 0.7))
    images = torch.randn(2, 3, SIZE, SIZE)
    assert channels.prunable_layers(one_shot) == channels.prunable_layers(given)
    assert torch.equal(one_shot.eval()(images), given.eval()(images))


def test_each_layer_keeps_exactly_the_widths_asked_and_the_others_all(dense):
    model = copy.deepcopy(dense)
    asked = {"features.0": 7, "features.24": 30, "classifier.0": 9}
    channels.prune(model, 0.0, SIZE, widths=asked)
    widths = channels.prunable_layers(model)
    assert {name: widths[name] for name in asked} == asked
    unasked = {n: w for n, w in channels.prunable_layers(dense).items() if n not in asked}
    assert {name: widths[name] for name in unasked} == unasked


def test_a_pruned_model_is_pruned_again_to_narrower_widths(dense):
    model = copy.deepcopy(dense)
    final = channels.uniform_widths(channels.prunable_layers(dense), 0.7)
    for widths in step_widths(channels.prunable_layers(dense), final, 3):
        channels.prune(model, 0.0, SIZE, widths=widths)
        assert channels.prunable_layers(model) == widths
    assert channels.prunable_layers(model) == final


def test_steps_shrink_geometrically_and_end_on_the_final_widths():
    plan = step_widths({"a": 64, "b": 100}, {"a": 8, "b": 10}, 3)
    assert plan[-1] == {"a": 8, "b": 10}
    assert plan[0] == {"a": 32, "b": 46} and plan[1] == {"a": 16, "b": 22}
    assert all(earlier[k] >= later[k] for earlier, later in zip(plan, plan[1:]) for k in "ab")


def test_the_epochs_are_shared_out_and_add_up():
    assert step_epochs(6, 3) == [2, 2, 2] and step_epochs(7, 3) == [2, 2, 3]
    assert sum(step_epochs(20, 3)) == 20
    with pytest.raises(UserError, match="--kd-epochs"):
        step_epochs(2, 3)
