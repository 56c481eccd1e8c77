"""Stage 3: prune the dense VGG's channels with NNI and make the layers really narrower.

Reads  WEIGHTS (vgg16Net.pth)          the dense checkpoint from train.py (or a bare VGG
                                       state dict, like the original demo's)
Writes OUTPUT (pruned_vgg16_net.pth)   the pruned, physically smaller model
       pruned_vgg16_net.channels.png   channels per layer before and after

Every Conv2d and Linear layer except the final classifier loses the SPARSITY
fraction of its output channels with the smallest L1 norm (NNI L1NormPruner);
NNI ModelSpeedup then rebuilds the layers without them, so parameters and FLOPs
really drop (by about 4x at sparsity 0.5). The script checks that the small model
computes the same outputs as the masked one before saving it. Accuracy drops;
knowledge_distillation.py wins it back.

    python pruner.py
    python pruner.py --sparsity 0.7 --output pruned70.pth
"""
import torch

from checkpoints import (atomic_save, check_replaceable, load_checkpoint, make_checkpoint,
                         model_from_checkpoint, output_path)
from cli import CheckFailed, fraction, image_size_type, make_parser, pyplot, quiet_nni, run_cli
from measure import count_flops, relative_difference
from model import architecture_of

# The sped-up model must compute what the masked one does, up to this relative difference.
TOLERANCE = 1e-3


def config_list(sparsity):
    return [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparsity,
             "exclude_op_names": ["classifier.6"]}]  # the final layer keeps one output per class


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--weights", default="vgg16Net.pth", help="dense checkpoint to prune")
    parser.add_argument("--sparsity", type=fraction, default=0.5,
                        help="fraction of channels removed from each pruned layer")
    parser.add_argument("--output", default="pruned_vgg16_net.pth", help="pruned checkpoint")
    parser.add_argument("--image-size", type=image_size_type, default=None,
                        help="input size used to trace the model and count FLOPs "
                             "(default: the one stored in the checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the check batch")
    parser.add_argument("--verbose", action="store_true", help="show NNI's warnings and logs")
    return parser


def prune(model, sparsity, image_size, seed=0, verbose=False):
    """Prune `model` in place (L1 norm + ModelSpeedup) and check it against the masked model.

    Returns the largest absolute difference between the masked and the sped-up
    outputs on a random batch, relative to the outputs' scale; over TOLERANCE it
    raises CheckFailed instead.
    """
    with quiet_nni(verbose):
        from nni.compression.pruning import L1NormPruner

        model.eval()
        batch = torch.randn(4, 3, image_size, image_size,
                            generator=torch.Generator().manual_seed(seed))
        pruner = L1NormPruner(model, config_list(sparsity))
        _, masks = pruner.compress()
        silence_pruned_batch_norm(model, masks)
        with torch.no_grad():
            masked_outputs = model(batch)  # the wrapped model applies the masks
        pruner.unwrap_model()
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


def plot_channels(before, after, path, sparsity):
    names, widths_before = layer_widths(before)
    _, widths_after = layer_widths(after)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 4))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], widths_before, width=0.4, label="dense")
    axis.bar([p + 0.2 for p in positions], widths_after, width=0.4, label="pruned")
    axis.set_xticks(list(positions), names, rotation=45)
    axis.set_yscale("log", base=2)
    axis.set(ylabel="output channels / units", title=f"Channels per layer, L1 sparsity {sparsity:g}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(args):
    check_replaceable(args.output)
    checkpoint = load_checkpoint(args.weights, kinds=("dense",), image_size=args.image_size)
    model = model_from_checkpoint(checkpoint, args.weights)
    image_size = args.image_size or checkpoint["image_size"]
    arch = checkpoint["architecture"]["arch"]

    flops_before, params_before = count_flops(model, image_size, args.verbose)
    print(f"Pruning {args.weights} ({arch}, {params_before / 1e6:.1f}M params) with L1 norm, "
          f"sparsity {args.sparsity:g}, traced at {image_size} px ...", flush=True)
    difference = prune(model, args.sparsity, image_size, args.seed, args.verbose)
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

    metrics = {"sparsity": args.sparsity, "params_before": params_before,
               "params_after": params_after, "flops_before": flops_before,
               "flops_after": flops_after, "flops_image_size": image_size,
               "dense_val_accuracy": checkpoint["metrics"].get("val_accuracy"),
               "dense_weights": args.weights}
    atomic_save(make_checkpoint(model, "pruned", arch, checkpoint["class_names"],
                                checkpoint["image_size"], checkpoint["normalization"], metrics),
                args.output)
    chart = output_path(args.output, "channels.png")
    plot_channels(before, after, chart, args.sparsity)
    print(f"Saved {args.output} and {chart}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
