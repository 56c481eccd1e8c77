"""Where a model's time goes, layer by layer, held against what this machine can do.

- `machine_peak()`: this machine's matrix-product speed, measured now, in billions of
  multiply-adds a second (GMAC/s): fp32 (torch.matmul) and int8 (onnxruntime's
  MatMulInteger, uint8 x int8): what each layer's speed is held against.
- `profile_model()`: one forward pass of a model split into its compute layers (each
  convolution with the batch norm and activation after it, each Linear layer) and
  the rest ("other": pools, reorders, quantisation steps and the runtime's time between
  operators), with the time of each
  (PyTorch's profiler for a checkpoint, onnxruntime's profiling for an .onnx file),
  its multiply-adds and GMAC/s; the pass itself timed as test.py times it.

Profiling slows what it watches (measured here: onnxruntime's int8 kernels by about a
quarter, PyTorch's passes by about a tenth), so each layer's time is its share of the
profiled pass times the pass timed without a profiler; both passes are reported.

Multiply-adds are what NNI's counter calls FLOPs (test.py --compare's FLOPs column):
a multiplication and its addition count once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import nn

import model as vgg
from compress.checkpoints import Checkpoint
from compress.cli import UserError
from compress.export.onnx_files import OnnxModel, session
from compress.measure.timing import measure_latency, median_seconds

# the peak: the fastest of square matrix products of these sizes (on the 2-core Xeon of
# this project, fp32 171 and 176 GMAC/s at 1024 and 2048, 169 at 512 and 3072)
GEMM_SIZES = (1024, 2048)
# onnxruntime's operators that compute a convolution or a matrix product, fp32 or int8
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv"}
LINEAR_OPS = {"Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger",
              "QGemm", "MatMulIntegerToFloat"}
CPU = torch.device("cpu")


@dataclasses.dataclass
class Layer:
    """One layer's share of a forward pass."""
    name: str  # conv1.., fc1.. for a VGG, the module's name for MobileNetV2; "other"
    kind: str  # "conv 3x3", "depthwise 3x3", "pointwise 1x1", "linear" or "other"
    seconds: float  # per forward pass
    macs: int  # multiply-adds per forward pass (0 for "other")


@dataclasses.dataclass
class Profile:
    """Where one model's forward pass of `batch` pictures goes (`layers`, the last one
    "other"), beside the pass timed whole without a profiler (`measured`, seconds) and
    with it (`profiled`), in `runtime`."""
    name: str
    path: str
    runtime: str  # "torch" or "onnxruntime"
    precision: str
    batch: int
    image_size: int
    measured: float
    profiled: float
    layers: list[Layer]

    def seconds(self, *kinds: str) -> float:
        """Seconds of the layers whose kind starts with one of `kinds` (all if none)."""
        return sum(layer.seconds for layer in self.layers
                   if not kinds or layer.kind.startswith(kinds))

    def macs(self, *kinds: str) -> int:
        """Multiply-adds of the layers whose kind starts with one of `kinds` (all if none)."""
        return sum(layer.macs for layer in self.layers
                   if not kinds or layer.kind.startswith(kinds))


def machine_peak(repeats: int = 10) -> dict[str, float]:
    """{"fp32": GMAC/s, "int8": GMAC/s}: the fastest square matrix product of GEMM_SIZES on
    this machine now, with PyTorch's threads (each the median of `repeats` timed runs)."""
    peaks = [gemm_speed(size, repeats) for size in GEMM_SIZES]
    return {precision: max(peak[precision] for peak in peaks) for precision in ("fp32", "int8")}


def gemm_speed(size: int, repeats: int) -> dict[str, float]:
    """{"fp32": GMAC/s, "int8": GMAC/s} of one `size`-square matrix product."""
    import onnx
    from onnx import TensorProto, helper

    macs = size ** 3
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator) for _ in range(2))
    fp32 = measure_latency(MatrixProduct(right), left, CPU, warmup=3, repeats=repeats)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])])
    inputs = {"a": torch.randint(0, 256, (size, size), dtype=torch.uint8,
                                 generator=generator).numpy(),
              "b": torch.randint(-128, 128, (size, size), dtype=torch.int8,
                                 generator=generator).numpy()}
    with tempfile.TemporaryDirectory(prefix="peak.") as folder:
        path = os.path.join(folder, "gemm.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
        runner = session(path)
        int8 = median_seconds(lambda: runner.run(None, inputs), lambda: None, 3, repeats)
    return {"fp32": macs / fp32 / 1e9, "int8": macs / int8 / 1e9}


class MatrixProduct(nn.Module):
    """`left @ right` for a fixed `right`: the fp32 peak's model."""

    def __init__(self, right: torch.Tensor):
        super().__init__()
        self.right = right

    def forward(self, left: torch.Tensor) -> torch.Tensor:
        return left @ self.right


def kind_of(module: nn.Module) -> str:
    """What kind of compute layer a convolution or Linear layer is."""
    if isinstance(module, nn.Linear):
        return "linear"
    kernel = "x".join(map(str, module.kernel_size))
    if module.groups > 1 and module.groups == module.in_channels:
        return f"depthwise {kernel}"
    return "pointwise 1x1" if kernel == "1x1" else f"conv {kernel}"


def layer_plan(network: nn.Module, architecture: vgg.Architecture) -> list[tuple[str, str, list]]:
    """(name, kind, modules) of each compute layer in the order they run -- a convolution
    with the batch norm and activation after it, a Linear layer with its activation --
    then ("other", "other", every other module: pools, dropout, ...)."""
    names = None
    if architecture["arch"] != vgg.MOBILENET_V2:
        convs = sum(width != "M" for width in architecture["features"])
        names = iter([f"conv{i + 1}" for i in range(convs)] + ["fc1", "fc2", "fc3"])
    plan, other = [], []
    for name, module in network.named_modules():
        if list(module.children()):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            plan.append((next(names) if names else name, kind_of(module), [module]))
        elif isinstance(module, (nn.BatchNorm2d, nn.ReLU, nn.ReLU6)) and plan:
            plan[-1][2].append(module)  # the convolution's (or Linear layer's) own
        else:
            other.append(module)
    return plan + [("other", "other", other)]


def multiply_adds(network: nn.Module, inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Multiply-adds of each convolution and Linear layer of `network` on `inputs`."""
    counts, handles = {}, []

    def count(module, args, output):
        per_output = (module.in_channels // module.groups * module.kernel_size[0]
                      * module.kernel_size[1]) if isinstance(module, nn.Conv2d) \
            else module.in_features
        counts[module] = output.numel() * per_output

    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(count))
    try:
        with torch.inference_mode():
            network(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def profile_model(name: str, path: str, checkpoint: Checkpoint, network: nn.Module, batch: int, *,
                  runs: int = 10, warmup: int = 3, verbose: bool = False) -> Profile:
    """Where a forward pass of `batch` pictures of `network` (a checkpoint's model on the
    CPU, or the OnnxModel of an .onnx file, `checkpoint` its description) spends its time:
    `runs` passes after `warmup` ones, profiled; and as many timed without a profiler."""
    size = checkpoint["image_size"]
    inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    onnx = isinstance(network, OnnxModel)
    # an .onnx file's layers: those of the widths it describes
    structure = vgg.from_architecture(checkpoint["architecture"]).eval() if onnx else network
    plan = layer_plan(structure, checkpoint["architecture"])
    macs = multiply_adds(structure, inputs)
    if not onnx:  # as test.py --compare times it
        network = network.to(CPU, memory_format=torch.channels_last).eval()
        inputs = inputs.to(memory_format=torch.channels_last)
    measured = measure_latency(network, inputs, CPU, warmup, runs)
    seconds, profiled = (onnx_layer_seconds(path, plan, inputs, runs, warmup) if onnx else
                         torch_layer_seconds(network, plan, inputs, runs, warmup, verbose))
    # "other" is what no compute layer took: its operators and the runtime's time between
    # them (both profiled as means per pass, so the layers add up to the pass)
    seconds[-1] = max(0.0, profiled - sum(seconds[:-1]))
    scale = measured / profiled  # the profiler's slowing, spread over the layers
    layers = [Layer(label, kind, time_taken * scale,
                    sum(macs.get(module, 0) for module in modules))
              for (label, kind, modules), time_taken in zip(plan, seconds)]
    return Profile(name, path, "onnxruntime" if onnx else "torch",
                   checkpoint.get("precision", "fp32"), batch, size, measured, profiled, layers)


@contextlib.contextmanager
def quiet_stderr(verbose: bool) -> Iterator[None]:
    """PyTorch's profiler (kineto) writes its start and stop to the process's stderr."""
    if verbose:
        yield
        return
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def torch_layer_seconds(network: nn.Module, plan: list, inputs: torch.Tensor, runs: int,
                        warmup: int, verbose: bool) -> tuple[list[float], float]:
    """(seconds per pass of each compute layer of `plan`, and 0 for "other"; the mean
    seconds of a profiled pass), by PyTorch's profiler: each compute layer's modules run
    inside a range labelled with its position, which holds all they compute."""
    from torch.profiler import ProfilerActivity, profile, record_function

    labels = {module: f"layer {index}" for index, (_, kind, modules) in enumerate(plan)
              if kind != "other" for module in modules}  # ("other": the rest of the pass)
    ranges, handles = {}, []

    def enter(module, args):
        ranges[module] = record_function(labels[module])
        ranges[module].__enter__()

    def leave(module, args, output):
        ranges.pop(module).__exit__(None, None, None)

    for module in labels:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                network(inputs)
            with quiet_stderr(verbose), profile(activities=[ProfilerActivity.CPU]) as profiler:
                started = time.perf_counter()
                for _ in range(runs):
                    network(inputs)
                profiled = (time.perf_counter() - started) / runs
    finally:
        for handle in handles:
            handle.remove()
    totals = [0.0] * len(plan)
    for event in profiler.key_averages():
        if event.key.startswith("layer "):
            totals[int(event.key.split()[1])] += event.cpu_time_total / 1e6 / runs
    return totals, profiled


def onnx_layer_seconds(path: str, plan: list, inputs: torch.Tensor, runs: int,
                       warmup: int) -> tuple[list[float], float]:
    """(seconds per pass of each compute layer of `plan`, and 0 for "other"; the mean
    seconds of a profiled pass), by onnxruntime's profiling: its convolutions and matrix
    products in the order they ran are the plan's compute layers in order. UserError if
    they do not match."""
    with tempfile.TemporaryDirectory(prefix="profile.") as folder:
        runner = session(path, profile_prefix=os.path.join(folder, "run"))
        feed = {runner.get_inputs()[0].name: inputs.contiguous().numpy()}
        for _ in range(warmup + runs):
            runner.run(None, feed)
        with open(runner.end_profiling()) as file:
            events = json.load(file)
    passes = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    kernels = [e for e in events if e.get("cat") == "Node"
               and e.get("name", "").endswith("_kernel_time")]
    computing = [index for index, (_, kind, _) in enumerate(plan) if kind != "other"]
    totals = [0.0] * len(plan)
    for start, end in passes:
        ran = sorted((e for e in kernels if start <= e["ts"] <= end), key=lambda e: e["ts"])
        compute = [e for e in ran if e["args"].get("op_name") in CONV_OPS | LINEAR_OPS]
        if len(compute) != len(computing):
            raise UserError(f"{path}: onnxruntime ran {len(compute)} convolutions and matrix "
                            f"products where its description has {len(computing)} layers; "
                            "its time cannot be told layer by layer")
        for index, event in zip(computing, compute):
            totals[index] += event["dur"] / 1e6 / len(passes)
    return totals, statistics.mean(end - start for start, end in passes) / 1e6
