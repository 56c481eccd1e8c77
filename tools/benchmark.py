"""Measure what pruning buys: dense vs pruned VGG16, side by side in one run.

Builds a dense VGG16 (random weights: the ratios do not depend on them), prunes
a copy exactly as pruner.py does (L1 norm, ModelSpeedup), and measures both on
the same inputs, on the same device and threads:

  params and FLOPs (NNI's counter), state-dict file size, batch-1 latency and
  batch-32 throughput (median of --repeats timed runs after --warmup runs), in
  both the default (contiguous) and the channels-last memory format.

    python tools/benchmark.py                        # 224 px, sparsity 0.5, CPU
    python tools/benchmark.py --image-size 64 --device cuda
"""
import io
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import (fraction, image_size_type, make_parser, non_negative_int,  # noqa: E402
                 positive_int, resolve_device, run_cli)
from measure import count_flops, measure_latency  # noqa: E402
from model import build_model  # noqa: E402
from pruner import prune  # noqa: E402


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--image-size", type=image_size_type, default=224)
    parser.add_argument("--sparsity", type=fraction, default=0.5)
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="batch of the throughput test")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--verbose", action="store_true")
    return parser


def file_bytes(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    dense = build_model("vgg16", 2, args.batch_norm).eval()
    pruned = build_model("vgg16", 2, args.batch_norm).eval()
    pruned.load_state_dict(dense.state_dict())
    print(f"Pruning VGG16 at {args.image_size} px, sparsity {args.sparsity:g} ...", flush=True)
    prune(pruned, args.sparsity, args.image_size, verbose=args.verbose)

    generator = torch.Generator().manual_seed(0)
    single = torch.randn(1, 3, args.image_size, args.image_size, generator=generator)
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    # Both memory formats: on a 2-core CPU channels-last was faster for both models
    # and closed most of the gap between the FLOPs ratio and the measured speed-up.
    formats = [torch.contiguous_format, torch.channels_last]
    rows = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        flops, params = count_flops(model, args.image_size, args.verbose)
        rows[name] = {"params": params, "flops": flops, "bytes": file_bytes(model)}
        model.to(device)
        for memory_format in formats:
            model.to(memory_format=memory_format)
            tag = ", contiguous" if memory_format == torch.contiguous_format else ", channels-last"
            rows[name]["latency" + tag] = measure_latency(
                model, single.to(memory_format=memory_format), device, args.warmup, args.repeats)
            rows[name]["batch" + tag] = measure_latency(
                model, batch.to(memory_format=memory_format), device, args.warmup, args.repeats)
            print(f"timed {name}{tag}", flush=True)

    dense_row, pruned_row = rows["dense"], rows["pruned"]
    print(f"\nVGG16, {args.image_size} px, L1 sparsity {args.sparsity:g}, on {device} "
          f"with {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':<36}{'dense':>12}{'pruned':>12}{'pruned/dense':>16}")
    for key, label, scale, unit in (("params", "params", 1e6, "M"), ("flops", "FLOPs", 1e9, "G"),
                                    ("bytes", "file size", 2**20, "MB")):
        print(f"{label:<36}{dense_row[key] / scale:>10.1f}{unit:<2}{pruned_row[key] / scale:>10.1f}"
              f"{unit:<2}{pruned_row[key] / dense_row[key]:>16.1%}")
    for key in [k for k in dense_row if k.startswith(("latency", "batch"))]:
        if key.startswith("latency"):
            label = "latency, batch 1" + key[len("latency"):]
            dense_value, pruned_value = dense_row[key] * 1000, pruned_row[key] * 1000
            unit, gain = "ms", dense_row[key] / pruned_row[key]
        else:
            label = f"throughput, batch {args.batch_size}" + key[len("batch"):]
            dense_value = args.batch_size / dense_row[key]
            pruned_value = args.batch_size / pruned_row[key]
            unit, gain = "/s", dense_row[key] / pruned_row[key]
        print(f"{label:<36}{dense_value:>10.1f}{unit:<2}{pruned_value:>10.1f}{unit:<2}"
              f"{gain:>9.2f}x faster")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
