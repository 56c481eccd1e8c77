"""Specification of single weights pruned (pruner.py --method l1-unstructured,
random-unstructured, --then-unstructured; compress/pruning/weights.py): torch's own
torch.nn.utils.prune, masks made permanent, zeros that survive distillation and export,
and a state dict pruned in someone's own code (weight_orig / weight_mask) read as one.
"""
import pytest
import torch
from torch.nn.utils import prune as torch_prune

import model as vgg
from compress.checkpoints import load_checkpoint, model_from_checkpoint
from compress.export.onnx_files import zero_weight_share
from compress.pruning.weights import weight_layers
from helpers import (NARROW, assert_clean_error, generate_demo, load_script, run_in_process,
                     small_checkpoint)

pruner = load_script("pruner")


def zeros_by_layer(path):
    """{layer: share of zero weights} of the checkpoint at `path`, for the pruned layers."""
    checkpoint = load_checkpoint(str(path))
    model = model_from_checkpoint(checkpoint, str(path))
    return {name: float((module.weight == 0).float().mean())
            for name, module in weight_layers(model).items()}


@pytest.fixture
def dense(tmp_path):
    return small_checkpoint(tmp_path / "vgg16Net.pth")


def test_l1_unstructured_zeroes_that_share_of_each_layer_and_saves_plain_weights(dense, tmp_path):
    proc = run_in_process(pruner, "--method", "l1-unstructured", "--sparsity", 0.8,
                          "--output", "zeros.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(tmp_path / "zeros.pth", weights_only=True)
    assert not any(key.endswith(("_orig", "_mask")) for key in saved["state_dict"])
    assert saved["architecture"] == load_checkpoint(str(dense))["architecture"]  # same shape
    shares = zeros_by_layer(tmp_path / "zeros.pth")
    assert len(shares) == 15 and all(abs(share - 0.8) < 0.01 for share in shares.values())
    # the smallest weights went: every kept weight is at least as large as any zeroed one
    before = model_from_checkpoint(load_checkpoint(str(dense)), str(dense))
    after = model_from_checkpoint(load_checkpoint(str(tmp_path / "zeros.pth")), "")
    for name, module in weight_layers(after).items():
        original = weight_layers(before)[name].weight.abs()
        kept = module.weight != 0
        assert original[kept].min() >= original[~kept].max()
    assert saved["state_dict"]["classifier.6.weight"].ne(0).all()  # the classifier is kept
    assert "all" in proc.stdout and "compressed" in proc.stdout and "80.0%" in proc.stdout


def test_global_random_unstructured_takes_the_share_over_all_layers_together(dense, tmp_path):
    proc = run_in_process(pruner, "--method", "random-unstructured", "--global",
                          "--sparsity", 0.5, "--output", "random.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shares = zeros_by_layer(tmp_path / "random.pth")
    metrics = torch.load(tmp_path / "random.pth", weights_only=True)["metrics"]
    assert abs(metrics["unstructured"]["zeros"]["all"] - 0.5) < 0.01
    assert max(shares.values()) - min(shares.values()) > 0.02  # not the same in each layer


def test_then_unstructured_zeroes_the_weights_channel_pruning_left(dense, tmp_path):
    proc = run_in_process(pruner, "--sparsity", 0.5, "--then-unstructured", 0.6,
                          "--output", "both.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    checkpoint = load_checkpoint(str(tmp_path / "both.pth"))
    assert checkpoint["architecture"]["features"][0] == NARROW["features"][0] // 2
    assert all(abs(share - 0.6) < 0.02 for share in zeros_by_layer(tmp_path / "both.pth").values())
    assert checkpoint["metrics"]["params_after"] < checkpoint["metrics"]["params_before"]


@pytest.mark.parametrize("flags, named", [
    (["--method", "l1-unstructured", "--then-unstructured", 0.5], "--then-unstructured"),
    (["--method", "random-unstructured", "--latency", 1], "--method random-unstructured"),
])
def test_contradicting_flags_are_one_line_errors(dense, tmp_path, flags, named):
    proc = run_in_process(pruner, *flags, cwd=tmp_path)
    assert_clean_error(proc, named)
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


def torch_pruned_state_dict(path, mask_shape=None):
    """A bare state dict saved by someone's own torch.nn.utils.prune code, masks attached:
    half of features.0's and of classifier.0's weights pruned by L1."""
    torch.manual_seed(0)
    model = vgg.from_architecture(NARROW)
    for name in ("features.0", "classifier.0"):
        torch_prune.l1_unstructured(model.get_submodule(name), "weight", amount=0.5)
    state = model.state_dict()
    if mask_shape is not None:
        state["features.0.weight_mask"] = torch.ones(mask_shape)
    torch.save(state, path)
    (path.parent / "class_indices.json").write_text('{"0": "cat", "1": "dog"}')
    return model


def test_a_state_dict_with_torch_prune_masks_is_read_with_the_masks_applied(tmp_path):
    model = torch_pruned_state_dict(tmp_path / "theirs.pth")
    checkpoint = load_checkpoint(str(tmp_path / "theirs.pth"), image_size=32)
    assert checkpoint["kind"] == "pruned"
    assert abs(checkpoint["metrics"]["unstructured"]["zeros"]["all"] - 0.5) < 0.01
    loaded = model_from_checkpoint(checkpoint, "theirs.pth")
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)  # orig x mask
    assert float((loaded.classifier[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow  # (a distillation and an export)
def test_zeros_survive_distillation_and_export(tmp_path):
    torch_pruned_state_dict(tmp_path / "theirs.pth")
    generate_demo(tmp_path / "photos", per_class=8)
    assert run_in_process(load_script("split_dataset"), "--source", "photos",
                          cwd=tmp_path).returncode == 0
    small_checkpoint(tmp_path / "vgg16Net.pth")
    proc = run_in_process(pruner, "--method", "l1-unstructured", "--sparsity", 0.7,
                          "--output", "zeros.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for student in ("zeros.pth", "theirs.pth"):
        before = zeros_by_layer(tmp_path / student) if student == "zeros.pth" else None
        proc = run_in_process(load_script("knowledge_distillation"), "--student", student,
                              "--output", f"kd_{student}", "--epochs", 2, "--lr", 1e-2,
                              "--batch-size", 8, "--workers", 0, "--image-size", 32,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        after = zeros_by_layer(tmp_path / f"kd_{student}")
        if before is not None:  # no zero weight came back, and no other became zero
            assert after == before
        distilled = torch.load(tmp_path / f"kd_{student}", weights_only=True)
        assert "unstructured" in distilled["metrics"]
    proc = run_in_process(load_script("export"), "--weights", "kd_zeros.pth",
                          "--output", "kd_zeros.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for onnx_file in ("kd_zeros.onnx", "kd_zeros.int8.onnx"):
        assert zero_weight_share(str(tmp_path / onnx_file)) > 0.65
    proc = run_in_process(load_script("test"), "--compare", "vgg16Net.pth", "kd_zeros.pth",
                          "kd_zeros.int8.onnx", "--repeats", 2, "--max-repeats", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    zeros = [line for line in proc.stdout.splitlines() if "of its weights are zero" in line]
    assert [line.split(":")[0] for line in zeros] == ["kd_zeros.pth", "kd_zeros.int8.onnx"]
    assert all("compressed" in line for line in zeros)  # (not the dense model: no zeros)


def test_a_mask_of_the_wrong_shape_is_one_line(tmp_path):
    torch_pruned_state_dict(tmp_path / "theirs.pth", mask_shape=(3, 3))
    proc = run_in_process(load_script("export"), "--weights", "theirs.pth", "--image-size", 32,
                          cwd=tmp_path)
    assert_clean_error(proc, "theirs.pth", "features.0.weight_mask", "shape")


def test_our_checkpoint_whose_weights_hold_torch_prune_masks_is_read_with_them_applied(
        tmp_path):
    """A checkpoint of this pipeline whose model someone pruned with torch.nn.utils.prune and
    saved before prune.remove(): its weight_orig / weight_mask pairs are folded, as in a
    bare state dict, not refused as weights of another architecture."""
    path = small_checkpoint(tmp_path / "vgg16Net.pth")
    checkpoint = torch.load(path, weights_only=True)
    model = vgg.from_architecture(checkpoint["architecture"])
    model.load_state_dict(checkpoint["state_dict"])
    torch_prune.l1_unstructured(model.features[0], "weight", amount=0.5)
    checkpoint["state_dict"] = model.state_dict()
    torch.save(checkpoint, path)
    loaded = load_checkpoint(str(path))
    assert not any(key.endswith(("_orig", "_mask")) for key in loaded["state_dict"])
    weights = model_from_checkpoint(loaded, str(path)).features[0].weight
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert "unstructured" in loaded["metrics"]
