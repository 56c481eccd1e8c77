"""Pruning with NNI: which channels go (the METHODS table), and a model that really shrinks.

- `prune()`: NNI's pruners rank each layer's output channels (or, `global_ranking`,
  all convolutions' together), the least important SPARSITY of them are masked (or,
  given `widths`, all but that many channels of each layer), then NNI's ModelSpeedup
  rebuilds the layers without them; the small model is checked against the masked
  one. In place, on a model.py VGG (dense or pruned before).
- `uniform_widths()`: the widths a uniform sparsity leaves, as NNI counts them.
- `Pruning`: how (method, sparsity, global ranking, ...), from pruner.py's flags or a
  sweep's setting; `prune_checkpoint()`: a dense checkpoint in, a pruned checkpoint and
  its report (widths, parameters and FLOPs before and after) out -- what pruner.py saves.
- `taylor_batches()`: the batches --method taylor ranks by; `check_rankable()`: the
  methods a checkpoint cannot be ranked by (slim without batch norm).

Every convolution and the two hidden Linear layers (not the final classifier) are
pruned; NNI 3.0's speedup is given a torch.fx graph (its own tracer fails on torch
>= 2.2).

    checkpoint = load_checkpoint("vgg16Net.pth", kinds=("dense",))
    pruned, report = prune_checkpoint(checkpoint, "vgg16Net.pth", Pruning("l1", sparsity=0.5))
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import typing
from collections.abc import Callable

import torch

from compress.checkpoints import (Checkpoint, atomic_save, check_made_for, make_checkpoint,
                                  model_from_checkpoint, output_path)
from compress.cli import CheckFailed, UserError, quiet_nni, settings_from
from compress.data.images import ImageFolder, eval_transform, make_loader
from compress.data.pictures import find_classes
from compress.measure.evaluation import count_flops, relative_difference
from compress.measure.reporting import plot_channels
from model import Architecture

# The sped-up model must compute what the masked one does, up to this relative difference.
TOLERANCE = 1e-3
HIDDEN_LINEAR = ["classifier.0", "classifier.3"]  # classifier.6 keeps one output per class
# --global: no layer loses more than this fraction of its channels
MOST_REMOVED = 0.9


# NNI's masks: {layer name: {"weight": mask, "bias": mask}}, 1 where a value is kept
Masks = dict[str, dict[str, torch.Tensor]]


class Method(typing.NamedTuple):
    """Which NNI pruner ranks the channels of the convolutions (by the weights of
    `conv_targets`) and which ranks the hidden Linear layers' units."""
    conv_pruner: str
    conv_targets: str
    linear_pruner: str
    about: str


METHODS = {
    "l1": Method("L1NormPruner", "Conv2d", "L1NormPruner", "smallest L1 norm of the weights"),
    "l2": Method("L2NormPruner", "Conv2d", "L2NormPruner", "smallest L2 norm of the weights"),
    # NNI's FPGM sums, one filter at a time, the distances to all others: on the first
    # hidden layer (4096 x 25088) 4096 passes over 400 MB (measured on 2 cores: 0.34 s
    # a pass, 23 min), on a 512-wide 3x3 convolution 512 passes over 9 MB (4 s)
    "fpgm": Method("FPGMPruner", "Conv2d", "L2NormPruner",
                   "convolution filters nearest the geometric median of their layer (FPGM); "
                   "the hidden Linear layers by L2 norm (FPGM on VGG16's first one takes "
                   "over 20 minutes)"),
    "taylor": Method("TaylorPruner", "Conv2d", "TaylorPruner",
                     "smallest first-order Taylor estimate of the loss change, from the "
                     "gradients of --taylor-batches batches of DATA/train (weights unchanged)"),
    # Network slimming (Liu et al. 2017): the batch-norm scale of a channel is its
    # importance, which train.py --bn-sparsity drives towards zero. (NNI's SlimPruner
    # trains scaling factors of its own instead; the scales' L1 norm is |gamma|.)
    "slim": Method("L1NormPruner", "BatchNorm2d", "L1NormPruner",
                   "smallest batch-norm scale |gamma| (network slimming; needs --batch-norm, "
                   "best after train.py --bn-sparsity; use with --global); the hidden Linear "
                   "layers by L1 norm"),
}


def config_lists(method: str, sparsity: float, global_ranking: bool,
                 widths: dict[str, tuple[int, int]] | None = None) -> dict:
    """{NNI pruner name: its config list}: the convolutions and the hidden Linear layers.
    `widths` ({layer name: (its width now, the width to keep)}) gives each layer a ratio
    of its own instead of `sparsity`."""
    method = METHODS[method]
    if widths is not None:
        return per_layer_configs(method, widths)
    groups = [({"op_types": [method.conv_targets]}, method.conv_pruner, "convolutions"),
              ({"op_names": HIDDEN_LINEAR}, method.linear_pruner, "hidden")]
    configs = {}
    for layers, pruner_name, group in groups:
        setting = {**layers, "sparse_ratio": sparsity}
        if global_ranking:
            setting.update(global_group_id=group, max_sparse_ratio=MOST_REMOVED)
        configs.setdefault(pruner_name, []).append(setting)
    return configs


def per_layer_configs(method: Method, widths: dict[str, tuple[int, int]]) -> dict:
    """Config lists that keep exactly `widths[name][1]` of each layer's channels."""
    configs = {}
    for name, (now, keep) in widths.items():
        if keep == now:
            continue
        is_conv = name.startswith("features.")
        if is_conv and method.conv_targets == "BatchNorm2d":  # slim: the scale after it
            parent, index = name.rsplit(".", 1)
            name = f"{parent}.{int(index) + 1}"
        # NNI prunes int(width x ratio) channels: half a channel above the count is exact
        setting = {"op_names": [name], "sparse_ratio": (now - keep + 0.5) / now}
        pruner_name = method.conv_pruner if is_conv else method.linear_pruner
        configs.setdefault(pruner_name, []).append(setting)
    return configs


def prunable_layers(model: torch.nn.Module) -> dict[str, int]:
    """{name: output width} of every layer prune() may thin: the convolutions (features.N)
    and the two hidden Linear layers, in order."""
    convs = {f"features.{index}": module.out_channels
             for index, module in enumerate(model.features)
             if isinstance(module, torch.nn.Conv2d)}
    return {**convs, **{name: model.get_submodule(name).out_features for name in HIDDEN_LINEAR}}


def uniform_widths(widths: dict[str, int], sparsity: float) -> dict[str, int]:
    """{layer: the width it keeps} where each layer of `widths` (prunable_layers()) loses
    `sparsity` of its channels, as NNI counts them (int(width x sparsity) pruned)."""
    return {name: width - int(width * sparsity) for name, width in widths.items()}


def prune(model: torch.nn.Module, sparsity: float, image_size: int, method: str = "l1",
          global_ranking: bool = False, seed: int = 0, batches: list = (),
          verbose: bool = False, widths: dict[str, int] | None = None) -> float:
    """Prune `model` in place (NNI's pruners of `method` + ModelSpeedup) and check it
    against the masked model.

    `widths` ({layer name: channels kept}, prunable_layers() names; a layer not named
    keeps all) replaces `sparsity`: each layer keeps its most important that many.
    `batches`: (images, labels) whose gradients --method taylor ranks by. Returns
    the largest absolute difference between the masked and the sped-up outputs on a
    random batch, relative to the outputs' scale; over TOLERANCE it raises
    CheckFailed instead.
    """
    with quiet_nni(verbose):
        model.eval()
        batch = torch.randn(4, 3, image_size, image_size,
                            generator=torch.Generator().manual_seed(seed))
        masks = {}
        now = prunable_layers(model)
        per_layer = None if widths is None else \
            {name: (now[name], keep) for name, keep in widths.items()}
        for pruner_name, config in config_lists(method, sparsity, global_ranking,
                                                per_layer).items():
            pruner = make_pruner(pruner_name, model, config, batches)
            masks.update(pruner.compress()[1])
            pruner.unwrap_model()
        if global_ranking:
            masks = with_floor(model, masks, 1 - MOST_REMOVED)
        masks = onto_convolutions(model, masks)
        apply_masks(model, masks)
        with torch.no_grad():
            masked_outputs = model(batch)
        speed_up(model, batch[:2], masks)
        model.eval()  # the layers speedup rebuilt start in training mode
        with torch.no_grad():
            outputs = model(batch)
    difference = relative_difference(outputs, masked_outputs)
    if not difference <= TOLERANCE:  # NaN too
        raise CheckFailed(f"the sped-up model ({len(masks)} pruned layers) differs from the "
                          f"masked model by {difference:.2e} (relative, more than {TOLERANCE:g}): "
                          "NNI's speedup did not preserve the network; nothing was saved")
    return difference


def make_pruner(name: str, model: torch.nn.Module, config: list[dict], batches: list):
    """NNI's pruner `name` on `model` with `config`; TaylorPruner collects the gradients of
    `batches` ((images, labels) pairs) without changing the weights."""
    import nni
    from nni.compression import pruning
    from nni.compression.utils import TorchEvaluator

    if name != "TaylorPruner":
        return getattr(pruning, name)(model, config)

    def training_step(batch, net):
        images, labels = batch
        return torch.nn.functional.cross_entropy(net(images), labels)

    def gradients(net, optimizer, step, lr_schedulers=None, max_steps=None, max_epochs=None):
        net.eval()  # batch-norm statistics stay as trained
        for batch in batches[:max_steps]:
            optimizer.zero_grad()
            step(batch, net).backward()
            optimizer.step()  # (lr 0: NNI collects the gradients when it steps)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    return pruning.TaylorPruner(model, config, TorchEvaluator(gradients, optimizer, training_step),
                                training_steps=len(batches))


def channel_masks(module: torch.nn.Module, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's weight and bias masks that keep the output channels where `kept` is True."""
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    return {"weight": kept.view(shape).expand_as(module.weight).float(),
            "bias": kept.float()}


def with_floor(model: torch.nn.Module, masks: Masks, fraction: float) -> Masks:
    """Masks in which every layer keeps at least `fraction` of its channels.

    NNI's global ranking takes one threshold across layers and may empty one (a
    layer's weights are on another scale than its neighbours'); such a layer keeps
    its channels of largest L1 norm (|gamma| for the batch-norm scales of slim),
    up to the floor.
    """
    floored = {}
    for name, targets in masks.items():
        module = model.get_submodule(name)
        kept = targets["weight"].reshape(len(targets["weight"]), -1).any(dim=1)
        least = max(1, round(fraction * len(kept)))
        if kept.sum() < least:  # add the largest of the others, up to the floor
            norms = module.weight.detach().reshape(len(kept), -1).abs().sum(1)
            norms[kept] = -1
            kept[norms.topk(least - int(kept.sum())).indices] = True
            targets = channel_masks(module, kept)
        floored[name] = targets
    return floored


def onto_convolutions(model: torch.nn.Module, masks: Masks) -> Masks:
    """Masks of batch-norm scales (--method slim) moved onto the convolution before each."""
    moved = {}
    for name, targets in masks.items():
        if not isinstance(model.get_submodule(name), torch.nn.BatchNorm2d):
            moved[name] = targets
            continue
        parent, index = name.rsplit(".", 1)
        conv_name = f"{parent}.{int(index) - 1}"
        moved[conv_name] = channel_masks(model.get_submodule(conv_name),
                                         targets["weight"].flatten().bool())
    return moved


def apply_masks(model: torch.nn.Module, masks: Masks) -> None:
    """Zero the pruned channels' weights (and the batch norm after them): the masked model,
    the network that speedup must reproduce."""
    with torch.no_grad():
        for name, targets in masks.items():
            module = model.get_submodule(name)
            for target, mask in targets.items():
                getattr(module, target).mul_(mask)
    silence_pruned_batch_norm(model, masks)


def speed_up(model: torch.nn.Module, example_inputs: torch.Tensor, masks: Masks) -> None:
    """Rebuild the masked layers without their pruned channels (NNI ModelSpeedup), in place."""
    from nni.compression.speedup import ModelSpeedup

    # NNI's own tracer fails on torch >= 2.2; give it a torch.fx graph instead.
    ModelSpeedup(model, example_inputs, masks,
                 graph_module=torch.fx.symbolic_trace(model)).speedup_model()


def silence_pruned_batch_norm(model: torch.nn.Module, masks: Masks) -> None:
    """Zero the BatchNorm scale and shift of pruned channels (removed by speedup anyway).

    A mask zeroes a conv channel, but the BatchNorm after it would still add its
    shift there, and NNI's speedup drops that constant rather than folding it into
    the next layer. With both zero the masked model is exactly the network that
    speedup builds (measured: 2e-8 apart instead of 3e-2), so the two can be
    compared output for output.
    """
    for index, module in enumerate(model.features):
        if isinstance(module, torch.nn.BatchNorm2d) and f"features.{index - 1}" in masks:
            kept = masks[f"features.{index - 1}"]["weight"].flatten(1).any(dim=1)
            with torch.no_grad():
                module.weight[~kept] = 0
                module.bias[~kept] = 0


def layer_widths(architecture: Architecture) -> tuple[list[str], list[int]]:
    """(layer names conv1.., fc1, fc2; their output widths) of a VGG architecture."""
    convs = [w for w in architecture["features"] if w != "M"]
    return ([f"conv{i + 1}" for i in range(len(convs))] + ["fc1", "fc2"],
            convs + list(architecture["classifier"]))


def taylor_batches(checkpoint: Checkpoint, path: str, data: str, count: int = 4,
                   batch_size: int = 32, seed: int = 0) -> list:
    """`count` batches of DATA/train drawn at random (`seed`), as the model sees pictures:
    what --method taylor ranks by. Refused if DATA/train has other classes than the
    checkpoint (read from `path`)."""
    folder = os.path.join(data, "train")
    check_made_for(checkpoint, path, folder, class_names=find_classes(folder))
    dataset = ImageFolder(folder, eval_transform(checkpoint["image_size"],
                                                 checkpoint["normalization"]),
                          checkpoint["class_names"])
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    loader = make_loader(dataset, batch_size, 0, torch.device("cpu"), sampler=order.tolist())
    return [batch for batch, _ in zip(loader, range(count))]


def check_rankable(checkpoint: Checkpoint, path: str, method: str, flag: str = "--method") -> None:
    """UserError if `method` (given by `flag`) cannot rank the channels of `checkpoint`."""
    if method == "slim" and not checkpoint["architecture"]["batch_norm"]:
        raise UserError(f"{path}: has no batch norm, and {flag} slim ranks channels by their "
                        "batch-norm scales: train with --batch-norm (and --bn-sparsity), or "
                        f"choose another {flag}")


def recipe_name(method: str, sparsity: float | None, global_ranking: bool = False) -> str:
    """How a pruning recipe is named in reports: 'l1, sparsity 0.5', 'slim, global sparsity 0.7',
    'l1, widths given' (sparsity None: per-layer widths)."""
    if sparsity is None:
        return f"{method}, widths given"
    return f"{method}, {'global ' if global_ranking else ''}sparsity {sparsity:g}"


@dataclasses.dataclass(frozen=True)
class Pruning:
    """How channels are pruned, each field as its flag of pruner.py (--global:
    `global_ranking`) and of a sweep's setting: the method (of METHODS), the share of
    channels removed, the size traced at (None: the checkpoint's), the check batch's seed,
    NNI's messages shown."""
    method: str = "l1"
    sparsity: float = 0.5
    global_ranking: bool = False
    image_size: int | None = None
    seed: int = 0
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: object) -> Pruning:
        """The pruning of parsed flags (`given` instead of some: a sweep's setting)."""
        return settings_from(cls, args, **given)

    def name(self) -> str:
        """As reports and charts name it: 'l1, sparsity 0.5'."""
        return recipe_name(self.method, self.sparsity, self.global_ranking)


def prune_checkpoint(checkpoint: Checkpoint, path: str, pruning: Pruning = Pruning(), *,
                     batches: list = (), widths: dict[str, int] | None = None,
                     say: Callable = print) -> tuple[Checkpoint, dict]:
    """(pruned checkpoint, report) of a dense `checkpoint` (read from `path`) pruned as
    `pruning` says, or of one pruned before (iterative pruning: `widths`, a layer's
    channels kept, as prune() takes them, in place of the sparsity, which is then only
    recorded).

    `batches` as for prune() (taylor_batches() for --method taylor). The report:
    the widths before and after, parameters, FLOPs and the masked-vs-sped-up
    difference; the pruned checkpoint's metrics hold the recipe and those counts.
    `say` is told when pruning starts.
    """
    method, sparsity, global_ranking = pruning.method, pruning.sparsity, pruning.global_ranking
    verbose = pruning.verbose
    check_rankable(checkpoint, path, method)
    model = model_from_checkpoint(checkpoint, path)
    image_size = pruning.image_size or checkpoint["image_size"]
    arch = checkpoint["architecture"]["arch"]
    flops_before, params_before = count_flops(model, image_size, verbose)
    say(f"Pruning {path} ({arch}, {params_before / 1e6:.1f}M params): "
        f"{recipe_name(method, None if widths else sparsity, global_ranking)}, traced at "
        f"{image_size} px ...", flush=True)
    difference = prune(model, sparsity, image_size, method, global_ranking, pruning.seed,
                       batches, verbose, widths)
    flops_after, params_after = count_flops(model, image_size, verbose)
    metrics = {"method": method, "global": global_ranking, "sparsity": sparsity,
               "params_before": params_before, "params_after": params_after,
               "flops_before": flops_before, "flops_after": flops_after,
               "flops_image_size": image_size,
               "dense_val_accuracy": checkpoint["metrics"].get("val_accuracy"),
               "dense_weights": path}
    pruned = make_checkpoint(model, "pruned", arch, checkpoint["class_names"],
                             checkpoint["image_size"], checkpoint["normalization"], metrics)
    report = dict(metrics, difference=difference, before=checkpoint["architecture"],
                  after=pruned["architecture"])
    # NNI's pruner, its wrappers and ModelSpeedup's traced graph hold the dense layers in
    # reference cycles that Python's collector, counting objects and not bytes, frees only
    # every few settings: a sweep of six grew 2.1-2.7 GB a setting (peak 12.7 GB for a
    # 537 MB model); freed now, it stays flat
    del model
    gc.collect()
    return pruned, report


def save_pruned(pruned: dict, report: dict, path: str, pruning: Pruning) -> str:
    """The pruned checkpoint saved to `path` (atomically) and its layer widths before and
    after drawn beside it (NAME.channels.png, titled by `pruning`), as pruner.py writes
    them; returns the figure's path."""
    atomic_save(pruned, path)
    names, before = layer_widths(report["before"])
    chart = output_path(path, "channels.png")
    plot_channels(names, before, layer_widths(report["after"])[1], chart, pruning.name())
    return chart
