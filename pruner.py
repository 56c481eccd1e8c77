"""Stage 3: prune the dense VGG's channels with NNI and make the layers really narrower.

Reads  WEIGHTS (vgg16Net.pth)          the dense checkpoint from train.py (or a bare VGG
                                       state dict, like the original demo's)
       DATA/train/                     only for --method taylor (a few batches)
Writes OUTPUT (pruned_vgg16_net.pth)   the pruned, physically smaller model
       pruned_vgg16_net.channels.png   channels per layer before and after

Every convolution and the two hidden Linear layers (not the final classifier) lose
the SPARSITY fraction of their output channels, the least important by --method
(NNI's pruners; the table METHODS below). With --global the fraction is taken from
all convolutions together (and from both hidden layers together), so the layers
that matter keep more. NNI ModelSpeedup then rebuilds the layers without the
pruned channels, so parameters and FLOPs really drop (by about 4x at sparsity
0.5). The script checks that the small model computes the same outputs as the
masked one before saving it. Accuracy drops; knowledge_distillation.py wins it back.

    python pruner.py
    python pruner.py --sparsity 0.7 --output pruned70.pth
    python pruner.py --method slim --global --sparsity 0.7   # after train.py --bn-sparsity
"""
import os
import typing

import torch

from checkpoints import (atomic_save, check_made_for, check_replaceable, load_checkpoint,
                         make_checkpoint, model_from_checkpoint, output_path)
from cli import (CheckFailed, UserError, fraction, image_size_type, make_parser, positive_int,
                 pyplot, quiet_nni, run_cli)
from data import ImageFolder, eval_transform, find_classes, make_loader
from measure import count_flops, relative_difference
from model import architecture_of

# The sped-up model must compute what the masked one does, up to this relative difference.
TOLERANCE = 1e-3
HIDDEN_LINEAR = ["classifier.0", "classifier.3"]  # classifier.6 keeps one output per class
# --global: no layer loses more than this fraction of its channels
MOST_REMOVED = 0.9


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


def config_lists(method, sparsity, global_ranking):
    """{NNI pruner name: its config list}: the convolutions and the hidden Linear layers."""
    method = METHODS[method]
    groups = [({"op_types": [method.conv_targets]}, method.conv_pruner, "convolutions"),
              ({"op_names": HIDDEN_LINEAR}, method.linear_pruner, "hidden")]
    configs = {}
    for layers, pruner_name, group in groups:
        setting = {**layers, "sparse_ratio": sparsity}
        if global_ranking:
            setting.update(global_group_id=group, max_sparse_ratio=MOST_REMOVED)
        configs.setdefault(pruner_name, []).append(setting)
    return configs


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--weights", default="vgg16Net.pth", help="dense checkpoint to prune")
    parser.add_argument("--method", default="l1", choices=METHODS, metavar="METHOD",
                        help="how channels are ranked: "
                             + "; ".join(f"{name}: {m.about}" for name, m in METHODS.items()))
    parser.add_argument("--sparsity", type=fraction, default=0.5,
                        help="fraction of channels removed from each pruned layer (with "
                             "--global: the fraction of all their weights together)")
    parser.add_argument("--global", dest="global_ranking", action="store_true",
                        help="rank channels across all convolutions (and across the two hidden "
                             "layers) instead of taking SPARSITY from each; no layer loses more "
                             f"than {MOST_REMOVED * 100:g}%% of its channels. Suits slim and "
                             "taylor, whose scores compare across layers; weight norms grow with a "
                             "layer's inputs, so l1/l2/fpgm --global thin the first layers most")
    parser.add_argument("--output", default="pruned_vgg16_net.pth", help="pruned checkpoint")
    parser.add_argument("--image-size", type=image_size_type, default=None,
                        help="input size used to trace the model and count FLOPs "
                             "(default: the one stored in the checkpoint)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the check batch (and of --method taylor's batches)")
    parser.add_argument("--data", default="dataset",
                        help="split dataset folder: --method taylor reads DATA/train")
    parser.add_argument("--taylor-batches", type=positive_int, default=4,
                        help="--method taylor: batches of DATA/train whose gradients rank channels")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="--method taylor: images per batch")
    parser.add_argument("--verbose", action="store_true", help="show NNI's warnings and logs")
    return parser


def prune(model, sparsity, image_size, method="l1", global_ranking=False, seed=0, batches=(),
          verbose=False):
    """Prune `model` in place (NNI's pruners of `method` + ModelSpeedup) and check it
    against the masked model.

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
        for pruner_name, config in config_lists(method, sparsity, global_ranking).items():
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


def make_pruner(name, model, config, batches):
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


def channel_masks(module, kept):
    """A layer's weight and bias masks that keep the output channels where `kept` is True."""
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    return {"weight": kept.view(shape).expand_as(module.weight).float(),
            "bias": kept.float()}


def with_floor(model, masks, fraction):
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


def onto_convolutions(model, masks):
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


def apply_masks(model, masks):
    """Zero the pruned channels' weights (and the batch norm after them): the masked model,
    the network that speedup must reproduce."""
    with torch.no_grad():
        for name, targets in masks.items():
            module = model.get_submodule(name)
            for target, mask in targets.items():
                getattr(module, target).mul_(mask)
    silence_pruned_batch_norm(model, masks)


def speed_up(model, example_inputs, masks):
    """Rebuild the masked layers without their pruned channels (NNI ModelSpeedup), in place."""
    from nni.compression.speedup import ModelSpeedup

    # NNI's own tracer fails on torch >= 2.2; give it a torch.fx graph instead.
    ModelSpeedup(model, example_inputs, masks,
                 graph_module=torch.fx.symbolic_trace(model)).speedup_model()


def silence_pruned_batch_norm(model, masks):
    """Zero the BatchNorm scale and shift of pruned channels (removed by speedup anyway).

    A mask zeroes a conv channel, but the BatchNorm after it would still add its
    shift there, and NNI's speedup drops that constant rather than folding it into
    the next layer. With both zero the masked model is exactly the network that
    speedup builds (measured: 2e-8 apart instead of 3e-2), so the two can be
    compared output for output.
    """
    for index, module in enumerate(model.features):
        if isinstance(module, torch.nn.BatchNorm2d):
            kept = masks[f"features.{index - 1}"]["weight"].flatten(1).any(dim=1)
            with torch.no_grad():
                module.weight[~kept] = 0
                module.bias[~kept] = 0


def layer_widths(architecture):
    convs = [w for w in architecture["features"] if w != "M"]
    return ([f"conv{i + 1}" for i in range(len(convs))] + ["fc1", "fc2"],
            convs + list(architecture["classifier"]))


def plot_channels(before, after, path, recipe):
    names, widths_before = layer_widths(before)
    _, widths_after = layer_widths(after)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 4))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], widths_before, width=0.4, label="dense")
    axis.bar([p + 0.2 for p in positions], widths_after, width=0.4, label="pruned")
    axis.set_xticks(list(positions), names, rotation=45)
    axis.set_yscale("log", base=2)
    axis.set(ylabel="output channels / units", title=f"Channels per layer, {recipe}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def taylor_batches(args, checkpoint):
    """--taylor-batches batches of DATA/train drawn at random (--seed), as the model sees
    pictures."""
    folder = os.path.join(args.data, "train")
    check_made_for(checkpoint, args.weights, folder, class_names=find_classes(folder))
    dataset = ImageFolder(folder, eval_transform(checkpoint["image_size"],
                                                 checkpoint["normalization"]),
                          checkpoint["class_names"])
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    loader = make_loader(dataset, args.batch_size, 0, torch.device("cpu"), sampler=order.tolist())
    return [batch for batch, _ in zip(loader, range(args.taylor_batches))]


def check_rankable(checkpoint, path, method, flag):
    """UserError if `method` (given by `flag`) cannot rank the channels of `checkpoint`."""
    if method == "slim" and not checkpoint["architecture"]["batch_norm"]:
        raise UserError(f"{path}: has no batch norm, and {flag} slim ranks channels by their "
                        "batch-norm scales: train with --batch-norm (and --bn-sparsity), or "
                        f"choose another {flag}")


def main(args):
    check_replaceable(args.output)
    checkpoint = load_checkpoint(args.weights, kinds=("dense",), image_size=args.image_size)
    check_rankable(checkpoint, args.weights, args.method, "--method")
    model = model_from_checkpoint(checkpoint, args.weights)
    image_size = args.image_size or checkpoint["image_size"]
    arch = checkpoint["architecture"]["arch"]
    batches = taylor_batches(args, checkpoint) if args.method == "taylor" else []

    recipe = f"{args.method}, {'global ' if args.global_ranking else ''}sparsity {args.sparsity:g}"
    flops_before, params_before = count_flops(model, image_size, args.verbose)
    print(f"Pruning {args.weights} ({arch}, {params_before / 1e6:.1f}M params): {recipe}, "
          f"traced at {image_size} px ...", flush=True)
    difference = prune(model, args.sparsity, image_size, args.method, args.global_ranking,
                       args.seed, batches, args.verbose)
    flops_after, params_after = count_flops(model, image_size, args.verbose)

    before, after = checkpoint["architecture"], architecture_of(model, arch)
    names, widths_before = layer_widths(before)
    _, widths_after = layer_widths(after)
    print(f"{'layer':<8}{'before':>8}{'after':>8}")
    for name, width_before, width_after in zip(names, widths_before, widths_after):
        print(f"{name:<8}{width_before:>8}{width_after:>8}")
    print(f"params {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    print(f"FLOPs  {flops_before:,} -> {flops_after:,} ({flops_after / flops_before:.1%}, "
          f"{flops_before / flops_after:.2f}x fewer) at {image_size} px")
    print(f"Sped-up model matches the masked model (max relative difference {difference:.1e}).")

    metrics = {"method": args.method, "global": args.global_ranking, "sparsity": args.sparsity,
               "params_before": params_before,
               "params_after": params_after, "flops_before": flops_before,
               "flops_after": flops_after, "flops_image_size": image_size,
               "dense_val_accuracy": checkpoint["metrics"].get("val_accuracy"),
               "dense_weights": args.weights}
    atomic_save(make_checkpoint(model, "pruned", arch, checkpoint["class_names"],
                                checkpoint["image_size"], checkpoint["normalization"], metrics),
                args.output)
    chart = output_path(args.output, "channels.png")
    plot_channels(before, after, chart, recipe)
    print(f"Saved {args.output} and {chart}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
