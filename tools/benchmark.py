"""Measure what pruning buys: dense vs pruned VGG16, side by side in one run.

Builds a dense VGG16 (random weights: the ratios do not depend on them), prunes
a copy exactly as pruner.py does (L1 norm, ModelSpeedup), and measures both on
the same inputs, on the same device and threads:

  params and FLOPs (NNI's counter), state-dict file size, batch-1 latency and
  batch-32 throughput (median of --repeats timed runs after --warmup runs), in
  both the default (contiguous) and the channels-last memory format.

Then the pruned model as it could ship, on the same inputs: exported to ONNX as
export.py does, in fp32 and static int8, run in onnxruntime. With --alternatives
also PyTorch's own int8 paths, the ones a reader will ask about: dynamic int8
(quantize_dynamic, Linear layers) and PT2E int8 (X86InductorQuantizer) compiled
by Inductor; the latter lives in torchao, which requirements.txt does not list
(pip install torchao to measure it; compiling took 6-8 s here). These int8 rows
are CPU measurements: with --device cuda they are left out.

    python tools/benchmark.py                        # 224 px, sparsity 0.5, CPU
    python tools/benchmark.py --image-size 48 --batch-norm --alternatives
    python tools/benchmark.py --image-size 64 --device cuda
"""
import copy
import io
import os
import tempfile
import time
import warnings

import torch

from compress.cli import (fraction, image_size_type, make_parser, non_negative_int, positive_int,
                          resolve_device, run_cli)
from compress.data.images import ORIGINAL_NORMALIZATION
from compress.export.convert import export_onnx, quantize_int8
from compress.export.onnx_files import OnnxModel, describe, session
from compress.machine.cpu import cpu_class, describe_cpu
from compress.measure.evaluation import count_flops
from compress.measure.timing import measure_latency
from compress.pruning.channels import prune
from model import architecture_of, build_model


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
    parser.add_argument("--alternatives", action="store_true",
                        help="also time PyTorch's dynamic int8 and PT2E int8 + torch.compile "
                             "(needs torchao)")
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

    shipping = None
    if device.type == "cpu":
        shipping = shipping_rows(pruned, single, batch, args, device)
    dense_row, pruned_row = rows["dense"], rows["pruned"]
    print(f"\nVGG16, {args.image_size} px, L1 sparsity {args.sparsity:g}, on {device} "
          f"with {torch.get_num_threads()} threads, torch {torch.__version__}\n"
          f"CPU: {describe_cpu()}")
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

    def eager(row):  # (batch-1 seconds, batch-N seconds, bytes) in channels-last
        return row["latency, channels-last"], row["batch, channels-last"], row["bytes"]

    if shipping is None:
        print("\n(The ONNX and int8 rows are measured on the CPU: run without --device cuda.)")
    else:
        print_shipping(shipping, eager(pruned_row), eager(dense_row), args)


def shipping_rows(pruned, single, batch, args, device):
    """[(label, seconds at batch 1, seconds at batch N, file bytes or None)] of the pruned
    model as it could ship, timed on the same inputs as PyTorch eager."""
    def timed(model, inputs=(single, batch)):
        return [measure_latency(model, x, device, max(1, args.warmup), args.repeats)
                for x in inputs]

    pruned = copy.deepcopy(pruned).to(memory_format=torch.contiguous_format)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, args.image_size, args.image_size, generator=generator)
                   for _ in range(4)]  # random weights: random pictures calibrate as well
    description = describe(
        {"kind": "pruned", "class_names": ["class_0", "class_1"], "image_size": args.image_size,
         "normalization": ORIGINAL_NORMALIZATION, "architecture": architecture_of(pruned, "vgg16")},
        "benchmark", "-")
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark.") as folder:
        fp32, int8 = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        export_onnx(pruned, fp32, description, args.verbose)
        quantize_int8(fp32, int8, calibration, cpu_class(), args.verbose)  # as export.py does
        for label, path in (("ONNX fp32, onnxruntime", fp32),
                            ("ONNX int8 static (QDQ), onnxruntime", int8)):
            runner = OnnxModel(session(path, device, spinning=True))
            rows.append((label, *timed(runner), os.path.getsize(path)))
            print(f"timed {label}", flush=True)
    if not args.alternatives:
        return rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(pruned), {torch.nn.Linear},
                                                         dtype=torch.qint8)
    dynamic.to(memory_format=torch.channels_last)
    channels_last = [x.to(memory_format=torch.channels_last) for x in (single, batch)]
    rows.append(("PyTorch dynamic int8 (Linear), eager", *timed(dynamic, channels_last),
                 file_bytes(dynamic)))
    print("timed PyTorch dynamic int8", flush=True)
    rows.append(pt2e_row(pruned, single, batch, calibration, timed))
    return rows


def pt2e_row(pruned, single, batch, calibration, timed):
    """PT2E static int8 for x86 (torchao's X86InductorQuantizer) compiled by Inductor."""
    label = "PT2E int8 + torch.compile (torchao)"
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        print(f"skipped {label}: torchao is not installed", flush=True)
        return (label + ": skipped, needs torchao", None, None, None)
    print(f"compiling {label} (minutes) ...", flush=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(pruned.eval(), (batch[:2],),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for pictures in calibration:
            prepared(pictures)
        torch._inductor.config.freezing = True  # int8 weights folded in, as torchao advises
        converted = allow_exported_model_train_eval(convert_pt2e(prepared))  # for eval()
        compiled = torch.compile(converted)
        started = time.perf_counter()
        compiled(single), compiled(batch)  # Inductor compiles for each input shape
        compile_seconds = time.perf_counter() - started
        seconds = timed(compiled)
    print(f"timed {label} (its first two calls compiled for {compile_seconds:.0f}s)", flush=True)
    return (f"{label}, compiled {compile_seconds:.0f}s", *seconds, None)


def print_shipping(rows, eager, dense, args):
    """The shipping table: each row's speed against the pruned and the dense model in eager."""
    print("\nThe pruned model as it could ship, same inputs and threads; ratios: faster than "
          "the pruned model (and the dense one) in PyTorch eager, channels-last")
    rows = [("PyTorch eager fp32, channels-last", *eager), *rows]
    width = max(len(row[0]) for row in rows) + 2
    print(f"{'':<{width}}{'latency b=1':>20}{f'throughput b={args.batch_size}':>26}{'file':>10}")
    for label, single, batch, size in rows:
        if single is None:  # skipped
            print(label)
            continue
        print(f"{label:<{width}}{single * 1000:>7.1f}ms {eager[0] / single:>4.1f}x "
              f"({dense[0] / single:>4.1f}x){args.batch_size / batch:>9.1f}/s "
              f"{eager[1] / batch:>4.1f}x ({dense[1] / batch:>4.1f}x)"
              + (f"{size / 2**20:>8.1f}MB" if size else ""))


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
