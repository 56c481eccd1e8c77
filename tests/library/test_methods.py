"""Specification of the pruning methods and of what feeds them.

- channels.prune(model, ..., method=METHOD) for each of l1, l2, fpgm, taylor and slim: every
  convolution and the two hidden Linear layers lose int(width * sparsity) channels
  (NNI rounds the removed count down), the ones of lowest score by the method, and the
  sped-up model computes what the masked one does.
- --global ranks across layers, and no layer keeps fewer than 1 - MOST_REMOVED of its
  channels (at least 1).
- pruner.py --method slim needs batch norm; bad --sparsity / --method values are
  one-line errors.
- train.py --bn-sparsity LAMBDA adds LAMBDA * sum(|gamma|) to the objective and records
  the penalty and the near-zero scales in the history; --bn-lr is the scales' own rate.
- knowledge_distillation.py --student-arch mobilenet_v2 distils into a MobileNetV2
  that test.py measures like any checkpoint.

Models are the narrow VGG16 of helpers.NARROW (with batch norm where asked), 32 px.
"""
import copy
import json
import shutil

import pytest
import torch
from torch import nn

import model as vgg
from compress import checkpoints
from compress.data.images import ORIGINAL_NORMALIZATION
from compress.pruning import channels
from compress.training import slimming
from helpers import (IMAGE_SIZE, NARROW, TRAIN_FLAGS, assert_clean_error, files_under,
                     generate_demo, load_script, run_in_process, run_script, small_checkpoint)

pruner = load_script("pruner")
train = load_script("train")
NARROW_BN = dict(NARROW, batch_norm=True)
SPARSITY = 0.3  # not 0.5: shows how a fraction of a channel is rounded


def narrow_bn_vgg(seed=0):
    """The NARROW VGG16 with batch norm, its statistics and scales random (some negative)."""
    torch.manual_seed(seed)
    model = vgg.from_architecture(NARROW_BN)
    with torch.no_grad():
        for norm in batch_norms(model):
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(-1.5, 1.5)
            norm.bias.uniform_(-0.1, 0.1)
    return model


def batch_norms(model):
    return [m for m in model.features if isinstance(m, nn.BatchNorm2d)]


def convolutions(model):
    return [m for m in model.features if isinstance(m, nn.Conv2d)]


def widths(model):
    """Output channels of every convolution, then of the two hidden Linear layers."""
    architecture = vgg.architecture_of(model, "vgg16")
    return [w for w in architecture["features"] if w != "M"] + architecture["classifier"]


def kept_channels(dense_norm, pruned_norm):
    """Indices of the dense layer's channels still there, found by their batch-norm scale."""
    survivors = set(pruned_norm.weight.tolist())
    return [i for i, scale in enumerate(dense_norm.weight.tolist()) if scale in survivors]


def largest(scores, count):
    return sorted(scores.topk(count).indices.tolist())


def some_batches(count=2, size=4):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
             torch.randint(0, 2, (size,), generator=generator)) for _ in range(count)]


# --- each method, layer by layer -------------------------------------------------------

@pytest.fixture(scope="module", params=list(channels.METHODS))
def pruned_by(request):
    """(method, dense copy, pruned model, prune()'s difference) at SPARSITY, per layer."""
    model = narrow_bn_vgg()
    dense = copy.deepcopy(model).eval()
    difference = channels.prune(model, SPARSITY, IMAGE_SIZE, request.param,
                              batches=some_batches())
    return request.param, dense, model, difference


def test_every_method_is_tried_here():
    assert set(channels.METHODS) == {"l1", "l2", "fpgm", "taylor", "slim"}


def test_each_layer_loses_the_sparsity_fraction_of_its_channels_rounded_down(pruned_by):
    _, dense, pruned, _ = pruned_by
    assert widths(pruned) == [w - int(w * SPARSITY) for w in widths(dense)]
    # 8 -> 6, 16 -> 12, 32 -> 23, 64 -> 45: the removed count is rounded down
    assert sorted(set(widths(pruned))) == [6, 12, 23, 45]
    assert pruned.classifier[6].out_features == 2


def test_each_method_gives_a_sped_up_model_equal_to_the_masked_one(pruned_by):
    _, _, _, difference = pruned_by
    assert 0 <= difference <= channels.TOLERANCE


def test_the_kept_architecture_rebuilds_and_keeps_batch_norm(pruned_by):
    _, _, pruned, _ = pruned_by
    architecture = vgg.architecture_of(pruned, "vgg16")
    assert architecture["batch_norm"]
    vgg.from_architecture(architecture).load_state_dict(pruned.state_dict(), strict=True)


SCORES = {"l1": lambda conv, norm: conv.weight.detach().abs().flatten(1).sum(1),
          "l2": lambda conv, norm: conv.weight.detach().flatten(1).norm(dim=1),
          "slim": lambda conv, norm: norm.weight.detach().abs()}


def test_norm_methods_and_slim_keep_the_channels_of_highest_score(pruned_by):
    """l1: L1 norm of the filter; l2: its L2 norm; slim: the batch-norm scale |gamma|."""
    method, dense, pruned, _ = pruned_by
    if method not in SCORES:
        pytest.skip(f"{method}'s score is NNI's own (geometric median, Taylor estimate)")
    layers = zip(convolutions(dense), batch_norms(dense), batch_norms(pruned))
    for index, (conv, norm, narrow_norm) in enumerate(layers):
        assert kept_channels(norm, narrow_norm) == largest(
            SCORES[method](conv, norm), narrow_norm.num_features), f"conv {index + 1}"


def test_l1_and_slim_rank_differently():
    """The control of the test above: the two scores do pick other channels here."""
    dense = narrow_bn_vgg()
    conv, norm = convolutions(dense)[0], batch_norms(dense)[0]
    assert largest(SCORES["l1"](conv, norm), 6) != largest(SCORES["slim"](conv, norm), 6)


@pytest.mark.slow  # (NNI's Taylor pruner twice)
def test_taylor_ranks_by_the_gradients_of_the_batches_it_is_given():
    """Other pictures, other gradients: another choice of channels somewhere."""
    kept = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        batches = [(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
                    torch.randint(0, 2, (4,), generator=generator)) for _ in range(2)]
        dense, model = narrow_bn_vgg(), narrow_bn_vgg()
        channels.prune(model, SPARSITY, IMAGE_SIZE, "taylor", batches=batches)
        kept.append([kept_channels(norm, narrow) for norm, narrow
                     in zip(batch_norms(dense), batch_norms(model))])
    assert kept[0] != kept[1]


# --- --global ---------------------------------------------------------------------------

TINY, LARGE = 4, 12  # indices (among the 13 batch norms) of two 32-channel layers


@pytest.fixture(scope="module")
def slim_global():
    """slim --global at 0.5 on a VGG where layer TINY's scales are all tiny (1e-3 and less,
    decreasing with the channel) while its filters' L1 norms increase with the channel,
    and layer LARGE's scales are all large."""
    model = narrow_bn_vgg()
    with torch.no_grad():
        tiny, conv = batch_norms(model)[TINY], convolutions(model)[TINY]
        count = tiny.num_features
        tiny.weight.copy_(1e-3 * torch.arange(count, 0, -1) / count)
        conv.weight.mul_((torch.arange(1.0, count + 1) / conv.weight.abs().flatten(1).sum(1))
                         .view(-1, 1, 1, 1))
        batch_norms(model)[LARGE].weight.uniform_(10, 20)
    dense = copy.deepcopy(model).eval()
    difference = channels.prune(model, 0.5, IMAGE_SIZE, "slim", global_ranking=True)
    return dense, model, difference


def floor(width):
    return max(1, round((1 - channels.MOST_REMOVED) * width))


def test_global_ranking_leaves_uneven_widths_none_below_the_floor(slim_global):
    dense, pruned, difference = slim_global
    before, after = widths(dense), widths(pruned)
    assert len({a / b for a, b in zip(after, before)}) > 3, after
    for index, (b, a) in enumerate(zip(before, after)):
        assert floor(b) <= a <= b, (index, b, a)
    assert difference <= channels.TOLERANCE


def test_the_floor_keeps_a_layer_the_global_threshold_would_empty(slim_global):
    dense, pruned, _ = slim_global
    assert widths(pruned)[TINY] == floor(32) == 3


def test_a_layer_of_large_scales_keeps_more_than_its_share(slim_global):
    _, pruned, _ = slim_global
    assert widths(pruned)[LARGE] > 32 * (1 - 0.5)
    assert widths(pruned)[LARGE] == 32


def test_the_floor_refills_a_slim_layer_with_its_largest_scales(slim_global):
    dense, pruned, _ = slim_global
    tiny = batch_norms(dense)[TINY]
    assert kept_channels(tiny, batch_norms(pruned)[TINY]) == largest(tiny.weight.abs(), 3)


def test_the_global_configs_share_one_group_per_kind_of_layer_and_cap_each_layer():
    configs = channels.config_lists("slim", 0.7, global_ranking=True)["L1NormPruner"]
    assert [c["global_group_id"] for c in configs] == ["convolutions", "hidden"]
    assert all(c["sparse_ratio"] == 0.7 and c["max_sparse_ratio"] == channels.MOST_REMOVED
               for c in configs)
    assert configs[0]["op_types"] == ["BatchNorm2d"]


# --- pruner.py refusals ----------------------------------------------------------------

def test_slim_on_a_model_without_batch_norm_is_refused(tmp_path):
    weights = small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(pruner, "--weights", weights, "--method", "slim", cwd=tmp_path)
    assert_clean_error(proc, "--method slim", "batch norm", "--batch-norm")
    assert files_under(tmp_path) == ["dense.pth"]


@pytest.mark.parametrize("flags, named", [(["--sparsity", 1], "--sparsity"),
                                          (["--sparsity", 0], "--sparsity"),
                                          (["--method", "nope"], "--method")])
def test_bad_pruner_values_are_one_line_errors(tmp_path, flags, named):
    weights = small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(pruner, "--weights", weights, *flags, cwd=tmp_path)
    assert_clean_error(proc, named)
    assert files_under(tmp_path) == ["dense.pth"]


# --- train.py --bn-sparsity -------------------------------------------------------------

LAMBDA = 1e-3
VGG11 = ["--arch", "vgg11", "--batch-norm", "--classifier-width", 64]


@pytest.fixture(scope="module")
def bn_start(tmp_path_factory):
    """A folder with a tiny dataset and start.pth: a VGG11 with batch norm whose scales are
    random, of both signs, 40 of them near zero -- the weights every run starts from."""
    folder = tmp_path_factory.mktemp("bn")
    generate_demo(folder / "dataset" / "train", per_class=4)
    generate_demo(folder / "dataset" / "val", per_class=2, seed=1)
    torch.manual_seed(0)
    model = vgg.build_model("vgg11", 2, batch_norm=True, classifier_width=64)
    scales = slimming.batch_norm_scales(model)
    with torch.no_grad():
        for scale in scales:
            scale.uniform_(-1.5, 1.5)
        scales[-1][:40] = 1e-3
    checkpoints.atomic_save(checkpoints.make_checkpoint(
        model, "dense", "vgg11", ["cat", "dog"], IMAGE_SIZE, ORIGINAL_NORMALIZATION, {}),
        str(folder / "start.pth"))
    return folder, [s.detach().clone() for s in scales]


def train_from_start(folder, output, *flags):
    proc = run_in_process(train, *VGG11, *TRAIN_FLAGS[:2], "--pretrained", "start.pth",
                          "--epochs", 1, "--batch-size", 8, "--workers", 0,
                          "--output", output, "--class-index", "classes.json", *flags,
                          cwd=folder)
    assert proc.returncode == 0, proc.stderr
    history = json.loads((folder / output.replace(".pth", ".history.json")).read_text())
    assert len(history) == 1
    return history[0]


def magnitudes(scales):
    return torch.cat([s.abs().flatten() for s in scales])


def test_the_bn_penalty_adds_lambda_times_the_sum_of_the_absolute_scales(bn_start):
    """With the weights held still (lr 1e-30) two runs see the same network and batches:
    their objectives differ by the penalty alone."""
    folder, start = bn_start
    plain = train_from_start(folder, "plain.pth", "--lr", 1e-30)
    penalised = train_from_start(folder, "penalised.pth", "--lr", 1e-30,
                                 "--bn-sparsity", LAMBDA)
    expected = LAMBDA * magnitudes(start).sum().item()
    assert expected > 1  # far above the float noise of the cross-entropy
    assert penalised["train_loss"] - plain["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert "bn_penalty" not in plain and "bn_scales_near_zero" not in plain


def test_the_history_records_the_penalty_and_near_zero_scales_of_the_saved_model(bn_start):
    folder, start = bn_start
    record = train_from_start(folder, "slimmed.pth", "--lr", 1e-3, "--bn-sparsity", LAMBDA)
    saved = torch.load(folder / "slimmed.pth", weights_only=True)
    assert saved["metrics"]["bn_sparsity"] == LAMBDA
    scales = [t for name, t in saved["state_dict"].items()
              if name.endswith(".weight") and t.dim() == 1 and name.startswith("features.")]
    assert len(scales) == 8  # VGG11's batch norms
    assert not torch.equal(magnitudes(scales), magnitudes(start))  # training moved them
    assert record["bn_penalty"] == pytest.approx(LAMBDA * magnitudes(scales).sum().item(),
                                                 rel=1e-6)
    near_zero = int((magnitudes(scales) < slimming.NEAR_ZERO).sum())
    assert record["bn_scales_near_zero"] == near_zero
    assert near_zero >= 40  # those set to 1e-3, one Adam step of 1e-3 away


def test_bn_lr_moves_the_scales_at_their_own_rate(bn_start):
    """One Adam step (8 pictures, batch 8) moves each weight by its learning rate: the
    scales by --bn-lr towards zero (the penalty dominates), the rest not at all (lr 1e-30)."""
    folder, start = bn_start
    train_from_start(folder, "fast_scales.pth", "--lr", 1e-30, "--bn-sparsity", 10,
                     "--bn-lr", 0.01)
    before = torch.load(folder / "start.pth", weights_only=True)["state_dict"]
    after = torch.load(folder / "fast_scales.pth", weights_only=True)["state_dict"]
    scales = [name for name, t in before.items()
              if name.startswith("features.") and name.endswith(".weight") and t.dim() == 1]
    for name in scales:
        moved = before[name].abs() - after[name].abs()
        large = before[name].abs() > 0.02  # (smaller ones may cross zero)
        assert torch.allclose(moved[large], torch.full_like(moved[large], 0.01), rtol=1e-3), name
    others = [name for name in before if name not in scales and "running" not in name
              and not name.endswith("num_batches_tracked")]
    assert all(torch.allclose(before[name], after[name], rtol=0, atol=1e-20) for name in others)


def test_bn_lr_without_batch_norm_is_a_one_line_error(bn_start):
    folder, _ = bn_start
    proc = run_in_process(train, *TRAIN_FLAGS, "--epochs", 1, "--workers", 0,
                          "--bn-lr", 0.01, "--output", "refused.pth", cwd=folder)
    assert_clean_error(proc, "--bn-lr", "--batch-norm")


def test_bn_sparsity_without_batch_norm_is_a_one_line_error(bn_start):
    folder, _ = bn_start
    proc = run_in_process(train, *TRAIN_FLAGS, "--epochs", 1, "--workers", 0,
                          "--bn-sparsity", LAMBDA, "--output", "refused.pth", cwd=folder)
    assert_clean_error(proc, "--bn-sparsity", "--batch-norm")
    assert not (folder / "refused.pth").exists()


def test_the_scale_sparsity_figures_by_hand():
    scales = [torch.tensor([0.5, -0.005, 2.0]), torch.tensor([-1.0, 0.0])]
    assert slimming.scale_sparsity(scales, 0.1) == {"bn_penalty": pytest.approx(0.1 * 3.505),
                                                 "bn_scales_near_zero": 2}


# --- a MobileNetV2 student --------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet(pipeline, tmp_path_factory):
    """The pipeline's dense model distilled into a new MobileNetV2 in a folder of its own."""
    folder = tmp_path_factory.mktemp("mobilenet")
    shutil.copytree(pipeline.path("dataset"), folder / "dataset")
    shutil.copy2(pipeline.path("vgg16Net.pth"), folder / "vgg16Net.pth")
    proc = run_script("knowledge_distillation.py", "--student-arch", "mobilenet_v2",
                      "--epochs", 1, "--batch-size", 8, "--workers", 0, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_a_mobilenet_v2_student_is_saved_under_its_default_name(mobilenet):
    folder, proc = mobilenet
    assert (folder / "finetuned_mobilenet_v2.pth").is_file()
    assert not (folder / "finetuned_vgg16_net.pth").exists()
    assert "saved finetuned_mobilenet_v2.pth" in proc.stdout


def test_the_mobilenet_v2_checkpoint_loads_safely_and_rebuilds(mobilenet):
    folder, _ = mobilenet
    checkpoint = torch.load(folder / "finetuned_mobilenet_v2.pth", weights_only=True)
    assert checkpoint["kind"] == "finetuned"
    assert checkpoint["architecture"] == {"arch": "mobilenet_v2", "batch_norm": True,
                                          "num_classes": 2}
    assert checkpoint["image_size"] == IMAGE_SIZE and checkpoint["class_names"] == ["cat", "dog"]
    model = vgg.from_architecture(checkpoint["architecture"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert type(model).__name__ == "MobileNetV2"


def test_test_py_measures_the_mobilenet_v2_student(mobilenet):
    folder, _ = mobilenet
    proc = run_in_process(load_script("test"), "--weights", "finetuned_mobilenet_v2.pth",
                          "--workers", 0, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "finetuned_mobilenet_v2.pth: accuracy" in proc.stdout
    assert (folder / "finetuned_mobilenet_v2.confusion.png").is_file()


def test_a_student_checkpoint_with_the_mobilenet_v2_student_is_refused(pipeline, tmp_path):
    proc = run_in_process(load_script("knowledge_distillation"), "--student-arch", "mobilenet_v2",
                          "--teacher", pipeline.path("vgg16Net.pth"),
                          "--student", pipeline.path("pruned_vgg16_net.pth"),
                          "--data", pipeline.path("dataset"), "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "--student", "mobilenet_v2")
    assert files_under(tmp_path) == []


def test_pretrained_weights_for_a_pruned_student_are_refused(pipeline, tmp_path):
    proc = run_in_process(load_script("knowledge_distillation"), "--pretrained", "x.pth",
                          "--teacher", pipeline.path("vgg16Net.pth"),
                          "--data", pipeline.path("dataset"), cwd=tmp_path)
    assert_clean_error(proc, "--pretrained", "--student-arch mobilenet_v2")
    assert files_under(tmp_path) == []


def test_a_mobilenet_v2_student_starts_from_torchvision_weights(pipeline, tmp_path):
    """torchvision's ImageNet file has 1000 classes: every tensor but the last layer loads."""
    import torchvision

    torch.manual_seed(1)
    imagenet_shaped = torchvision.models.mobilenet_v2(num_classes=1000).state_dict()
    torch.save(imagenet_shaped, tmp_path / "mobilenet_v2-b0353104.pth")
    proc = run_script("knowledge_distillation.py", "--student-arch", "mobilenet_v2",
                      "--pretrained", "mobilenet_v2-b0353104.pth", "--epochs", 1,
                      "--lr", 1e-30, "--batch-size", 8, "--workers", 0,
                      "--teacher", pipeline.path("vgg16Net.pth"),
                      "--data", pipeline.path("dataset"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("Starting the student from mobilenet_v2-b0353104.pth; new classifier.1.bias, "
            "classifier.1.weight") in proc.stdout
    saved = torch.load(tmp_path / "finetuned_mobilenet_v2.pth", weights_only=True)["state_dict"]
    # (lr 1e-30: the weights are still those loaded)
    assert torch.allclose(saved["features.0.0.weight"], imagenet_shaped["features.0.0.weight"])
    assert saved["classifier.1.weight"].shape == (2, 1280)


def test_weights_of_another_network_as_the_mobilenet_start_are_refused(pipeline, tmp_path):
    proc = run_in_process(load_script("knowledge_distillation"), "--student-arch",
                          "mobilenet_v2", "--pretrained", pipeline.path("vgg16Net.pth"),
                          "--teacher", pipeline.path("vgg16Net.pth"),
                          "--data", pipeline.path("dataset"), "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "vgg16Net.pth", "MobileNetV2")
    assert files_under(tmp_path) == []
