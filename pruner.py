"""Stage 3: prune the dense VGG's channels with NNI and make the layers really narrower.

Reads  WEIGHTS (vgg16Net.pth)          the dense checkpoint from train.py (or a bare VGG
                                       state dict, like the original demo's)
       DATA/train/                     only for --method taylor (a few batches)
Writes OUTPUT (pruned_vgg16_net.pth)   the pruned, physically smaller model
       pruned_vgg16_net.channels.png   channels per layer before and after

Every convolution and the two hidden Linear layers (not the final classifier) lose
the SPARSITY fraction of their output channels, the least important by --method
(NNI's pruners; the table METHODS in compress/pruning/channels.py). With --global the
fraction is taken from all convolutions together (and from both hidden layers
together), so the layers that matter keep more. NNI ModelSpeedup then rebuilds
the layers without the pruned channels, so parameters and FLOPs really drop (by
about 4x at sparsity 0.5). The script checks that the small model computes the
same outputs as the masked one before saving it. Accuracy drops;
knowledge_distillation.py wins it back.

With --latency MS (or --speedup X against the dense model) the widths are chosen per
layer instead, for the time they cost on this CPU in the runtime that will run the
model (--runtime: int8 ONNX in onnxruntime as export.py ships it, or PyTorch; at
--batch): a latency model of this CPU (compress/pruning/latency.py; measured once,
about a minute, then kept in a cache) predicts each layer's time from its widths, and
the channels that matter least per millisecond they cost go first
(compress/pruning/allocation.py). The report prints the widths beside those of the
uniform sparsity of the same predicted latency, and both models' predicted and
measured latency.

    python pruner.py
    python pruner.py --sparsity 0.7 --output pruned70.pth
    python pruner.py --method slim --global --sparsity 0.7   # after train.py --bn-sparsity
    python pruner.py --latency 2.5 --output fast.pth         # 2.5 ms a picture in int8 here
    python pruner.py --speedup 10 --runtime pytorch --batch 32
    python pruner.py --method l1-unstructured --sparsity 0.8 --output zeros80.pth
    python pruner.py --sparsity 0.5 --then-unstructured 0.8 --output both.pth
"""
import os

from compress.checkpoints import atomic_save, check_replaceable, load_checkpoint
from compress.cli import (UserError, add_shared_flags, add_verbose_arg, fraction, make_parser,
                          positive_float, positive_int, run_cli)
from compress.machine.resources import check_writable
from compress.pruning.allocation import allocation_for, target_of
from compress.pruning.channels import (METHODS, MOST_REMOVED, Pruning, layer_widths,
                                       prune_checkpoint, save_pruned, taylor_batches)
from compress.pruning.latency import RUNTIMES, load_or_build, measure, with_widths
from compress.pruning.weights import UNSTRUCTURED, compressed_bytes, prune_weights_checkpoint


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--weights", default="vgg16Net.pth", help="dense checkpoint to prune")
    parser.add_argument("--method", default="l1", choices=[*METHODS, *UNSTRUCTURED],
                        metavar="METHOD",
                        help="how channels are ranked: "
                             + "; ".join(f"{name}: {m.about}" for name, m in METHODS.items())
                             + ". Or single weights zeroed: "
                             + "; ".join(f"{name}: {about}"
                                         for name, (_, about) in UNSTRUCTURED.items()))
    parser.add_argument("--sparsity", type=fraction,
                        help="fraction of channels removed from each pruned layer (with "
                             "--global: the fraction of all their weights together); default "
                             "0.5, unless --latency or --speedup")
    parser.add_argument("--latency", type=positive_float, metavar="MS",
                        help="choose each layer's width so that a forward pass takes MS "
                             "milliseconds on this CPU (predicted) in --runtime at --batch")
    parser.add_argument("--speedup", type=positive_float, metavar="X",
                        help="... or X times less than the dense model's (predicted)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="int8",
                        help="--latency/--speedup: int8 (the .int8.onnx file export.py ships, "
                             "in onnxruntime) or pytorch (the checkpoint, fp32)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="--latency/--speedup: pictures per forward pass")
    parser.add_argument("--global", dest="global_ranking", action="store_true",
                        help="rank channels across all convolutions (and across the two hidden "
                             "layers) instead of taking SPARSITY from each; no layer loses more "
                             f"than {MOST_REMOVED * 100:g}%% of its channels. Suits slim and "
                             "taylor, whose scores compare across layers; weight norms grow with a "
                             "layer's inputs, so l1/l2/fpgm --global thin the first layers most")
    parser.add_argument("--then-unstructured", type=fraction, metavar="S",
                        help="after channel pruning, zero the S fraction of the weights left "
                             "(l1-unstructured; with --global, of all layers together)")
    add_shared_flags(parser, "--output",
                     output={"default": "pruned_vgg16_net.pth", "help": "pruned checkpoint"})
    add_shared_flags(parser, "--image-size", "--seed", "--data", image_size={
        "help": "input size used to trace the model and count FLOPs (default: the one stored in "
                "the checkpoint)"}, seed={
        "help": "seed of the check batch (and of --method taylor's batches)"}, data={
        "help": "split dataset folder: --method taylor reads DATA/train"})
    parser.add_argument("--taylor-batches", type=positive_int, default=4,
                        help="--method taylor: batches of DATA/train whose gradients rank channels")
    add_shared_flags(parser, "--batch-size",
                     batch_size={"help": "--method taylor: images per batch"})
    add_verbose_arg(parser)
    return parser


def main(args):
    timed = args.latency is not None or args.speedup is not None
    one_target = "one target at a time: the widths follow from it"
    weights = "it prunes single weights already; --then-unstructured follows channel pruning"
    for flag, other, given, why in (
            ("--latency", "--speedup", args.latency and args.speedup, one_target),
            ("--sparsity", "--latency or --speedup", timed and args.sparsity is not None,
             one_target),
            ("--global", "--latency or --speedup", timed and args.global_ranking, one_target),
            ("--then-unstructured", f"--method {args.method}",
             args.method in UNSTRUCTURED and args.then_unstructured is not None, weights),
            (f"--method {args.method}", "--latency or --speedup",
             timed and args.method in UNSTRUCTURED,
             "a latency is reached by removing channels; zeros do not make it faster")):
        if given:
            raise UserError(f"{flag}: not with {other} ({why})")
    check_replaceable(args.output)
    check_writable(args.output, "--output")
    checkpoint = load_checkpoint(args.weights, kinds=("dense",), image_size=args.image_size)
    sparsity = 0.5 if args.sparsity is None else args.sparsity
    if args.method in UNSTRUCTURED:
        pruned = prune_weights_checkpoint(checkpoint, args.weights, method=args.method,
                                          sparsity=sparsity, global_ranking=args.global_ranking,
                                          seed=args.seed)
        save_unstructured(pruned, args.output)
        return
    widths = allocated_widths(args, checkpoint) if timed else None
    batches = (taylor_batches(checkpoint, args.weights, args.data, args.taylor_batches,
                              args.batch_size, args.seed) if args.method == "taylor" else [])
    pruning = Pruning.from_args(args, sparsity=sparsity)
    pruned, report = prune_checkpoint(checkpoint, args.weights, pruning, batches=batches,
                                      widths=widths)

    names, widths_before = layer_widths(report["before"])
    _, widths_after = layer_widths(report["after"])
    print(f"{'layer':<8}{'before':>8}{'after':>8}")
    for name, width_before, width_after in zip(names, widths_before, widths_after):
        print(f"{name:<8}{width_before:>8}{width_after:>8}")
    params_before, params_after = report["params_before"], report["params_after"]
    flops_before, flops_after = report["flops_before"], report["flops_after"]
    print(f"params {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    print(f"FLOPs  {flops_before:,} -> {flops_after:,} ({flops_after / flops_before:.1%}, "
          f"{flops_before / flops_after:.2f}x fewer) at {report['flops_image_size']} px")
    print("Sped-up model matches the masked model (max relative difference "
          f"{report['difference']:.1e}).")

    if args.then_unstructured is not None:
        pruned = prune_weights_checkpoint(pruned, args.weights, method="l1-unstructured",
                                          sparsity=args.then_unstructured,
                                          global_ranking=args.global_ranking, seed=args.seed)
    chart = save_pruned(pruned, report, args.output, pruning)
    print(f"Saved {args.output} and {chart}")
    if args.then_unstructured is not None:
        print_zeros(pruned, args.output)


def save_unstructured(pruned, output):
    """Save a checkpoint of single weights pruned, and say what it holds."""
    atomic_save(pruned, output)
    print(f"Saved {output}")
    print_zeros(pruned, output)


def print_zeros(pruned, output):
    """The share of zero weights per layer and overall, and the file raw and compressed."""
    zeros = pruned["metrics"]["unstructured"]["zeros"]
    print(f"{'layer':<14}{'zero weights':>13}")
    for name, share in zeros.items():
        print(f"{name:<14}{share:>13.1%}")
    raw, packed = os.path.getsize(output), compressed_bytes(output)
    print(f"{output}: {raw / 2**20:.1f} MB, {packed / 2**20:.1f} MB compressed (deflate, as zip "
          f"does: {raw / packed:.1f}x smaller); dense kernels run no faster on zeros: "
          "test.py --compare measures it")


def allocated_widths(args, checkpoint):
    """The widths --latency or --speedup asks for on this CPU, with their report: each
    layer beside the uniform sparsity of the same predicted latency; both models'
    predicted and measured latency."""
    architecture = checkpoint["architecture"]
    image_size = args.image_size or checkpoint["image_size"]
    latency = load_or_build(architecture, image_size, args.runtime, args.batch)
    target = target_of(latency, architecture, args.latency, args.speedup)
    chosen = allocation_for(latency, architecture, target)
    print(chosen.report)
    dense_ms = latency.predict(architecture)
    print(f"{args.runtime}, batch {args.batch}, {image_size} px, {latency.key['cpu']}: dense "
          f"{dense_ms:.2f} ms predicted; target {target:.2f} ms; widths in steps of "
          f"{latency.step} (the kernels' time, one 3x3 layer: "
          + ", ".join(f"{width:.0f}: {ms:.3f}" for width, ms in latency.steps[::4]) + " ms)")
    for name, widths, ms in (("allocated", chosen.widths, chosen.predicted),
                             (f"uniform {chosen.sparsity:.2f}", chosen.uniform,
                              chosen.uniform_ms)):
        measured = measure(with_widths(architecture, widths), image_size, args.runtime,
                           args.batch)
        print(f"  {name}: {ms:.2f} ms predicted, {measured:.2f} ms measured "
              f"({(ms - measured) / measured:+.0%} off)", flush=True)
    return chosen.widths


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
