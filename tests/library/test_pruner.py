"""Specification of channels.prune: L1-norm channel pruning made physical by NNI's speedup.

A random-weight VGG16 (2 classes, 32 px) is pruned at sparsity 0.5. Besides what
prune() reports, the tests check independently that exactly the half of each
layer's output channels with the smallest L1 norm was removed, that the kept
weights are the dense model's own, and that the small model computes what the
dense model computes with those channels zeroed.
"""
import copy

import pytest
import torch
from torch import nn

import model as vgg
from compress.pruning import channels  # noqa: E402
from helpers import (IMAGE_SIZE, assert_clean_error, files_under, load_script, run_in_process,
                     small_checkpoint)

DENSE_PARAMS = 134_268_738


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "batch_norm"])
def pruned(request):
    """(dense copy, pruned model, prune()'s reported difference) for one VGG16 variant."""
    torch.manual_seed(0)
    model = vgg.build_model("vgg16", num_classes=2, batch_norm=request.param)
    if request.param:  # give batch norm non-trivial statistics and affine parameters
        with torch.no_grad():
            for module in model.features:
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.1, 0.1)
    dense = copy.deepcopy(model).eval()
    difference = channels.prune(model, 0.5, IMAGE_SIZE)
    return dense, model, difference


def kept_channels(weight, keep):
    """Indices of the `keep` output channels with the largest L1 norm, in order."""
    norms = weight.detach().abs().flatten(1).sum(1)
    return torch.sort(torch.topk(norms, keep).indices).values


def layers(model):
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    return convs, norms, linears


def test_sped_up_model_matches_the_masked_model(pruned):
    _, _, difference = pruned
    assert 0 <= difference < 1e-3


def test_a_sped_up_model_that_differs_from_the_masked_one_is_refused_and_not_saved(
        tmp_path, monkeypatch):
    """The check of prune() must be able to fire: the speedup is made to change the network."""
    speed_up = channels.speed_up

    def speed_up_then_change_the_last_layer(model, example_inputs, masks):
        speed_up(model, example_inputs, masks)
        with torch.no_grad():
            model.classifier[6].weight.mul_(1.1)  # outputs 10% off

    monkeypatch.setattr(channels, "speed_up", speed_up_then_change_the_last_layer)
    weights = small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(load_script("pruner"), "--weights", weights, cwd=tmp_path)
    assert_clean_error(proc, "15 pruned layers", "differs from the masked model by 1.00e-01",
                       "nothing was saved", status=1)
    assert files_under(tmp_path) == ["dense.pth"]


def test_parameters_drop_to_about_a_quarter(pruned):
    dense, small, _ = pruned
    assert vgg.count_parameters(dense) == DENSE_PARAMS + (8448 if vgg.architecture_of(
        dense, "vgg16")["batch_norm"] else 0)
    assert 0.22 <= vgg.count_parameters(small) / vgg.count_parameters(dense) <= 0.28


def test_every_layer_but_the_last_is_halved(pruned):
    dense, small, _ = pruned
    before, after = vgg.architecture_of(dense, "vgg16"), vgg.architecture_of(small, "vgg16")
    assert after["features"] == [w if w == "M" else w // 2 for w in before["features"]]
    assert after["classifier"] == [2048, 2048]
    assert after["num_classes"] == 2 and after["batch_norm"] == before["batch_norm"]


def test_the_weakest_channels_by_l1_norm_are_the_ones_removed(pruned):
    dense, small, _ = pruned
    dense_convs, dense_norms, dense_linears = layers(dense)
    convs, norms, linears = layers(small)
    previous = torch.arange(3)
    for index, (big, narrow) in enumerate(zip(dense_convs, convs)):
        kept = kept_channels(big.weight, big.out_channels // 2)
        assert torch.equal(narrow.weight, big.weight[kept][:, previous]), f"conv {index + 1}"
        assert torch.equal(narrow.bias, big.bias[kept]), f"conv {index + 1}"
        if norms:
            for name in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(norms[index], name),
                                   getattr(dense_norms[index], name)[kept]), (index, name)
        previous = kept
    # the flatten after 7x7 pooling turns each kept channel into 49 inputs of fc1
    previous = (previous[:, None] * 49 + torch.arange(49)).flatten()
    for index, (big, narrow) in enumerate(zip(dense_linears, linears)):
        last = index == len(linears) - 1
        kept = torch.arange(big.out_features) if last else kept_channels(big.weight,
                                                                          big.out_features // 2)
        assert torch.equal(narrow.weight, big.weight[kept][:, previous]), f"fc {index + 1}"
        assert torch.equal(narrow.bias, big.bias[kept]), f"fc {index + 1}"
        previous = kept


def test_small_model_computes_what_the_dense_model_computes_with_those_channels_zeroed(pruned):
    dense, small, _ = pruned
    masked = copy.deepcopy(dense)
    convs, norms, linears = layers(masked)
    with torch.no_grad():
        for index, layer in enumerate(convs + linears[:-1]):
            removed = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            removed[kept_channels(layer.weight, layer.weight.shape[0] // 2)] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
            if norms and index < len(norms):
                norms[index].weight[removed] = 0
                norms[index].bias[removed] = 0
        generator = torch.Generator().manual_seed(1)
        batch = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        expected, got = masked.eval()(batch), small.eval()(batch)
    scale = expected.abs().max()
    assert scale > 0
    assert ((got - expected).abs().max() / scale).item() < 1e-4


def test_pruned_architecture_rebuilds_from_plain_data(pruned):
    _, small, _ = pruned
    rebuilt = vgg.from_architecture(vgg.architecture_of(small, "vgg16")).eval()
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    batch = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), small.eval()(batch))
    assert type(small.features) is nn.Sequential  # still our VGG's layout, not an fx graph
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in small.modules()]
