"""Specification of model.py: one VGG, described by plain data, torchvision-compatible."""
import pytest
import torch
import torchvision

import model as vgg


def shapes(state_dict):
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return vgg.build_model("vgg16", num_classes=2).eval()


def test_vgg16_has_torchvisions_parameter_names_and_shapes(dense):
    with torch.device("meta"):  # shapes only: skip the slow weight initialisation
        reference = torchvision.models.vgg16(num_classes=2)
    assert shapes(dense.state_dict()) == shapes(reference.state_dict())
    assert list(dense.state_dict()) == list(reference.state_dict())


def test_vgg16_with_batch_norm_matches_torchvisions_vgg16_bn():
    with torch.device("meta"):
        ours = vgg.build_model("vgg16", num_classes=3, batch_norm=True)
        reference = torchvision.models.vgg16_bn(num_classes=3)
    assert shapes(ours.state_dict()) == shapes(reference.state_dict())
    assert any(name.endswith("running_mean") for name in ours.state_dict())


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="vgg17"):
        vgg.build_model("vgg17")


def test_torchvision_imagenet_weights_load_keeping_our_final_layer(dense):
    torch.manual_seed(1)
    imagenet = torchvision.models.vgg16().state_dict()  # 1000 classes
    ours = vgg.build_model("vgg16", num_classes=2)
    final_before = {k: v.clone() for k, v in ours.state_dict().items()
                    if k.startswith("classifier.6.")}
    replaced = vgg.load_pretrained(ours, imagenet)
    assert sorted(replaced) == ["classifier.6.bias", "classifier.6.weight"]
    loaded = ours.state_dict()
    for name, tensor in loaded.items():
        if name.startswith("classifier.6."):
            assert torch.equal(tensor, final_before[name])
            assert tensor.shape[0] == 2
        else:
            assert torch.equal(tensor, imagenet[name]), name


def test_weights_that_do_not_fit_are_refused_and_nothing_is_loaded(dense):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    narrower = dict(before, **{"features.0.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(ValueError, match="do not fit.*features.0.weight"):
        vgg.load_pretrained(dense, narrower)
    incomplete = {k: v for k, v in before.items() if k != "features.28.bias"}
    with pytest.raises(ValueError, match="features.28.bias"):
        vgg.load_pretrained(dense, incomplete)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("size", [32, 64, 100])
def test_any_input_size_reaches_the_classifier(dense, size):
    with torch.no_grad():
        out = dense(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


PRUNED = {"arch": "vgg16", "batch_norm": False, "num_classes": 2,  # as a pruner could leave it
          "features": [16, 15, "M", 32, 32, "M", 64, 50, 64, "M", 128, 128, 100, "M",
                       128, 128, 120, "M"],
          "classifier": [512, 300]}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_architecture_round_trips_a_narrower_model(batch_norm):
    architecture = dict(PRUNED, batch_norm=batch_norm)
    torch.manual_seed(2)
    narrow = vgg.from_architecture(architecture).eval()
    described = vgg.architecture_of(narrow, "vgg16")
    assert described == architecture
    rebuilt = vgg.from_architecture(described).eval()
    rebuilt.load_state_dict(narrow.state_dict(), strict=True)
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), narrow(batch))
    assert vgg.count_parameters(narrow) < 134_268_738 / 10


def test_classifier_width_narrows_only_the_two_hidden_linear_layers(dense):
    with torch.device("meta"):
        narrow = vgg.build_model("vgg16", num_classes=2, classifier_width=64)
    described = vgg.architecture_of(narrow, "vgg16")
    assert described == dict(vgg.architecture_of(dense, "vgg16"), classifier=[64, 64])
    convs = sum(t.numel() for k, t in dense.state_dict().items() if k.startswith("features."))
    head = (512 * 7 * 7 * 64 + 64) + (64 * 64 + 64) + (64 * 2 + 2)
    assert vgg.count_parameters(narrow) == convs + head


def test_architecture_is_plain_data(dense):
    described = vgg.architecture_of(dense, "vgg16")
    assert described == {"arch": "vgg16", "batch_norm": False, "num_classes": 2,
                         "features": vgg.CONV_WIDTHS["vgg16"], "classifier": [4096, 4096]}
    assert vgg.count_parameters(dense) == 134_268_738
