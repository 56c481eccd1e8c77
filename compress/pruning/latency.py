"""How long a VGG of given layer widths takes on this CPU, in the runtime that ships it.

A uniform sparsity takes as much from the layers that cost time as from those that do
not. To prune to a latency we need each layer's time as a function of its widths, in
the runtime that will run the model (onnxruntime int8 as export.py ships it, or
PyTorch fp32), at the batch size it will see. Measured, not counted: on these CPUs time
is far from multiply-adds (thin layers run at a few per cent of the peak, and a share
of the pass is outside every layer).

- `LatencyModel`: per compute layer, time = a * multiply-adds + b * outputs + c (a, b, c
  shared by the layers of one feature-map size, and by the Linear layers), plus the
  time outside the layers, d + e * all activations; `predict(widths)` in ms.
- `build()`: VGGs of random widths (and the dense and a uniform one) exported as the
  runtime ships them, each profiled layer by layer (measure.profiling) at the batch
  size, and the model fitted to every layer's time (non-negative least squares). Kept
  in a cache keyed by the CPU, the runtime's version, the threads, the image size, the
  batch and the dense architecture (`load_or_build()`): built once, about a minute.
- `step_table()`: one mid-network convolution timed at every output width of a range:
  where the kernels' time jumps, the width step they favour (int8 kernels work in
  blocks of channels).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import model as vgg
from compress.checkpoints import make_checkpoint, write_json
from compress.data.images import ORIGINAL_NORMALIZATION
from compress.export.convert import export_onnx, int8_settings, quantize_int8
from compress.export.onnx_files import describe, load_onnx
from compress.machine.cpu import cpu_class, describe_cpu
from compress.measure.profiling import profile_model
from compress.measure.timing import median_seconds

RUNTIMES = ("int8", "pytorch")  # what a latency target is measured in
FITTED_MODELS = 8  # the dense one, three uniform ones, and random widths
UNIFORM_SHARES = (0.5, 0.2, 0.08)  # the uniform models fitted on keep these shares
SMALLEST_SHARE = 0.05  # a random layer keeps at least this share of its channels
CPU = torch.device("cpu")
FORM = "vgg-prune-distill-latency/2"  # the model's form and sampling: a new one, a new cache


def cache_folder() -> str:
    """Where latency models are kept: $XDG_CACHE_HOME/vgg-prune-distill/latency."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vgg-prune-distill", "latency")


def layers_of(architecture: vgg.Architecture, image_size: int) -> list[dict]:
    """Each compute layer of a VGG (conv1.., fc1..fc3): its name, group (the feature map's
    size, or "linear"), multiply-adds and outputs per picture."""
    layers, size, channels, index = [], image_size, 3, 0
    for width in architecture["features"]:
        if width == "M":
            size //= 2
            continue
        index += 1
        layers.append({"name": f"conv{index}", "group": f"conv{size}",
                       "macs": 9 * channels * width * size * size, "outputs": width * size * size})
        channels = width
    inputs = channels * vgg.POOLED_SIZE ** 2
    for number, width in enumerate([*architecture["classifier"], architecture["num_classes"]], 1):
        layers.append({"name": f"fc{number}", "group": "linear", "macs": inputs * width,
                       "outputs": width})
        inputs = width
    return layers


def with_widths(architecture: vgg.Architecture, widths: dict[str, int]) -> vgg.Architecture:
    """The architecture with the widths of pruning.channels.prunable_layers() names
    (features.N, classifier.0, classifier.3) replaced."""
    features = []
    for index, width in enumerate(architecture["features"]):
        features.append("M" if width == "M" else
                        widths.get(f"features.{module_index(architecture, index)}", width))
    hidden = [widths.get(name, width)
              for name, width in zip(("classifier.0", "classifier.3"), architecture["classifier"])]
    return dict(architecture, features=features, classifier=hidden)


def module_index(architecture: vgg.Architecture, position: int) -> int:
    """The index in `features` (nn.Sequential) of the convolution at `position` of the
    architecture's width list (a conv is followed by batch norm, if any, and ReLU)."""
    per_conv = 3 if architecture["batch_norm"] else 2
    index = 0
    for width in architecture["features"][:position]:
        index += 1 if width == "M" else per_conv
    return index


def widths_of(architecture: vgg.Architecture) -> dict[str, int]:
    """The prunable layers' widths of an architecture, by prunable_layers() names."""
    widths = {}
    for position, width in enumerate(architecture["features"]):
        if width != "M":
            widths[f"features.{module_index(architecture, position)}"] = width
    return {**widths, "classifier.0": architecture["classifier"][0],
            "classifier.3": architecture["classifier"][1]}


@dataclasses.dataclass
class LatencyModel:
    """Predicted milliseconds of a forward pass (see the module), for `key`'s CPU, runtime,
    image size and batch. `coefficients`: {group: [a, b, c]}; `other`: [d, e];
    `fitted`: the models it was fitted on, [{"widths", "measured_ms", "predicted_ms"}];
    `steps`: step_table()'s [(width, ms)], and `step` the width step it shows the
    kernels favour."""
    key: dict
    coefficients: dict[str, list[float]]
    other: list[float]
    fitted: list[dict] = dataclasses.field(default_factory=list)
    steps: list[list[float]] = dataclasses.field(default_factory=list)
    step: int = 1

    def layer_ms(self, architecture: vgg.Architecture) -> dict[str, float]:
        """Each compute layer's predicted milliseconds, and "other"'s."""
        batch, layers = self.key["batch"], layers_of(architecture, self.key["image_size"])
        times = {}
        for layer in layers:
            a, b, c = self.coefficients[layer["group"]]
            times[layer["name"]] = a * batch * layer["macs"] + b * batch * layer["outputs"] + c
        d, e = self.other
        times["other"] = d + e * batch * sum(layer["outputs"] for layer in layers)
        return times

    def predict(self, architecture: vgg.Architecture) -> float:
        """The predicted milliseconds of one forward pass of `architecture`."""
        return sum(self.layer_ms(architecture).values())

    def save(self, path: str) -> None:
        """As JSON (atomically)."""
        write_json(dataclasses.asdict(self), path)


def key_of(architecture: vgg.Architecture, image_size: int, runtime: str, batch: int) -> dict:
    """What a latency model depends on: the CPU, the runtime and its version, the threads,
    the image size, the batch, and the dense architecture."""
    import onnxruntime

    versions = ({"onnxruntime": onnxruntime.__version__, "int8": int8_settings(cpu_class())}
                if runtime == "int8" else {"torch": torch.__version__})
    return {"form": FORM, "cpu": describe_cpu(), "runtime": runtime, **versions,
            "threads": torch.get_num_threads(), "image_size": image_size, "batch": batch,
            "architecture": {k: architecture[k] for k in ("arch", "batch_norm", "features",
                                                          "classifier", "num_classes")}}


def cache_path(key: dict) -> str:
    """The cache file of a latency model of `key`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_folder(), f"{key['runtime']}-b{key['batch']}-{digest}.json")


def cached(architecture: vgg.Architecture, image_size: int, runtime: str,
           batch: int) -> LatencyModel | None:
    """The latency model of the dense `architecture` if the cache holds it, else None."""
    key = key_of(architecture, image_size, runtime, batch)
    try:
        with open(cache_path(key)) as file:
            saved = json.load(file)
        return LatencyModel(**saved) if saved["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_build(architecture: vgg.Architecture, image_size: int, runtime: str, batch: int,
                  say: Callable = print) -> LatencyModel:
    """The latency model of the dense `architecture`, from the cache or built now (and kept)."""
    known = cached(architecture, image_size, runtime, batch)
    if known is not None:
        return known
    key = key_of(architecture, image_size, runtime, batch)
    path = cache_path(key)
    say(f"Measuring this CPU for a latency model ({runtime}, batch {batch}, {image_size} px; "
        f"kept in {cache_folder()}) ...", flush=True)
    latency = build(architecture, image_size, runtime, batch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    latency.save(path)
    return latency


def sample_architectures(architecture: vgg.Architecture, count: int,
                         seed: int = 0) -> list[vgg.Architecture]:
    """The dense architecture, uniform ones keeping UNIFORM_SHARES of every layer, then
    random widths per layer (a share from SMALLEST_SHARE to 1, log-uniform: as many thin
    layers as wide ones): the models a latency model is fitted on."""
    generator = random.Random(seed)
    dense = widths_of(architecture)
    samples = [architecture] + [
        with_widths(architecture, {n: max(1, round(w * share)) for n, w in dense.items()})
        for share in UNIFORM_SHARES]
    while len(samples) < count:
        samples.append(with_widths(architecture, {
            name: max(1, round(width * SMALLEST_SHARE ** generator.random()))
            for name, width in dense.items()}))
    return samples[:count]


def measure(architecture: vgg.Architecture, image_size: int, runtime: str, batch: int) -> float:
    """The measured milliseconds of a forward pass of `architecture` (random weights) as
    `runtime` runs it, at `batch`: what a prediction is checked against."""
    with tempfile.TemporaryDirectory(prefix="latency.") as folder:
        return measured_layers(architecture, image_size, runtime, batch, folder)[1]


def measured_layers(architecture: vgg.Architecture, image_size: int, runtime: str, batch: int,
                    folder: str) -> tuple[dict[str, float], float]:
    """({layer or "other": ms}, the pass in ms) of a randomly initialised VGG of
    `architecture`, as `runtime` runs it (int8: exported and quantised as export.py does,
    calibrated on random pictures), profiled layer by layer at `batch`."""
    torch.manual_seed(0)
    network = vgg.from_architecture(architecture).eval()
    checkpoint = make_checkpoint(network, "pruned", architecture["arch"],
                                 [str(i) for i in range(architecture["num_classes"])],
                                 image_size, ORIGINAL_NORMALIZATION, {})
    path = os.path.join(folder, "model.pth")
    if runtime == "int8":
        fp32, path = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
        export_onnx(network, fp32, describe(checkpoint, "model.pth", "-"))
        calibration = [torch.randn(8, 3, image_size, image_size) for _ in range(2)]
        quantize_int8(fp32, path, calibration, cpu_class())
        checkpoint, network = load_onnx(path)
    profile = profile_model("sample", path, checkpoint, network, batch)
    return ({layer.name: layer.seconds * 1000 for layer in profile.layers},
            profile.measured * 1000)


def build(architecture: vgg.Architecture, image_size: int, runtime: str, batch: int,
          count: int = FITTED_MODELS, steps: range = range(48, 81)) -> LatencyModel:
    """A latency model fitted to `count` VGGs of sampled widths (sample_architectures()),
    with the step table of `steps` widths and the step it favours."""
    key = key_of(architecture, image_size, runtime, batch)
    samples, measured = sample_architectures(architecture, count), []
    with tempfile.TemporaryDirectory(prefix="latency.") as folder:
        for sample in samples:
            measured.append(measured_layers(sample, image_size, runtime, batch, folder))
    rows = [(layer, times[layer["name"]]) for sample, (times, _) in zip(samples, measured)
            for layer in layers_of(sample, image_size)]
    coefficients = {}
    for group in dict.fromkeys(layer["group"] for layer, _ in rows):
        points = [(layer, ms) for layer, ms in rows if layer["group"] == group]
        coefficients[group] = relative_fit(
            [[batch * layer["macs"], batch * layer["outputs"], 1.0] for layer, _ in points],
            [ms for _, ms in points])
    other = relative_fit([[1.0, batch * sum(layer["outputs"]
                                            for layer in layers_of(sample, image_size))]
                          for sample in samples], [times["other"] for times, _ in measured])
    table = step_table(image_size, runtime, batch, steps)
    latency = LatencyModel(key, coefficients, other, steps=table, step=favoured_step(table))
    latency.fitted = [{"widths": widths_of(sample), "measured_ms": whole,
                       "predicted_ms": latency.predict(sample)}
                      for sample, (_, whole) in zip(samples, measured)]
    return latency


def relative_fit(design: list[list[float]], times: list[float]) -> list[float]:
    """Non-negative coefficients x with design @ x near `times`, each point's error relative
    to its time (a thin layer's 0.05 ms matters as much as a wide one's 5 ms)."""
    from scipy.optimize import nnls

    weights = 1 / np.maximum(np.array(times), 1e-6)
    matrix = np.array(design) * weights[:, None]
    scale = np.maximum(matrix.max(axis=0), 1e-30)  # (columns of like size: well conditioned)
    solution, _ = nnls(matrix / scale, np.array(times) * weights)
    return (solution / scale).tolist()


def step_table(image_size: int, runtime: str, batch: int, widths: range,
               inputs: int = 128) -> list[tuple[int, float]]:
    """[(output width, ms)]: a 3x3 convolution of `inputs` channels and its ReLU on a
    feature map a quarter of `image_size`, timed at each of `widths` (consecutive; int8:
    quantised as export.py quantises, run in onnxruntime)."""
    size = max(4, image_size // 4)
    images = torch.randn(batch, inputs, size, size)
    table = []
    with tempfile.TemporaryDirectory(prefix="steps.") as folder:
        for width in widths:
            weight, bias = torch.randn(width, inputs, 3, 3) * 0.05, torch.randn(width) * 0.1
            if runtime == "int8":
                run = onnx_layer(weight, bias, images, folder)
            else:
                layer = nn.Sequential(nn.Conv2d(inputs, width, 3, padding=1), nn.ReLU()).eval()
                layer = layer.to(memory_format=torch.channels_last)
                batch_in = images.to(memory_format=torch.channels_last)

                def run(layer=layer, batch_in=batch_in):
                    with torch.inference_mode():
                        layer(batch_in)
            table.append((width, 1000 * median_seconds(run, lambda: None, 5, 25)))
    return table


def onnx_layer(weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
               folder: str) -> Callable[[], object]:
    """A function that runs a 3x3 convolution (`weight`, `bias`) and ReLU on `images` as
    int8 ONNX in onnxruntime, quantised as export.py quantises (the graph written with
    onnx's helpers: exporting each width from PyTorch would take seconds)."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from compress.export.convert import Batches
    from compress.export.onnx_files import INPUT

    width, inputs = weight.shape[:2]
    shape = [None, inputs, *images.shape[2:]]
    graph = helper.make_graph(
        [helper.make_node("Conv", [INPUT, "weight", "bias"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["output"])], "layer",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.numpy(), "weight"),
         numpy_helper.from_array(bias.numpy(), "bias")])
    fp32, int8 = os.path.join(folder, "layer.onnx"), os.path.join(folder, "layer.int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    settings = int8_settings(cpu_class())
    quantize_static(fp32, int8, Batches([images]), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=settings["per_channel"], reduce_range=settings["reduce_range"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    runner = onnxruntime.InferenceSession(int8, options, providers=["CPUExecutionProvider"])
    feed = {INPUT: images.numpy()}
    return lambda: runner.run(None, feed)


def favoured_step(table: list[tuple[int, float]], margin: float = 0.1) -> int:
    """The largest width step s (of 16, 8, 4, 2) whose multiples the kernels favour: after
    the table's linear trend (more channels, more time) is taken out, widths that are
    multiples of s take at least `margin` of the mean time less than the widths between
    them that are multiples of s / 2 (1 for s = 2): median against median, so one noisy
    timing moves neither. 1 if none stands out."""
    widths = np.array([width for width, _ in table])
    times = np.array([ms for _, ms in table])
    residuals = times - np.polyval(np.polyfit(widths, times, 1), widths)
    for step in (16, 8, 4, 2):
        multiples = widths % step == 0
        between = ~multiples & (widths % max(1, step // 2) == 0)
        if multiples.sum() >= 2 and between.sum() >= 2 and \
                np.median(residuals[multiples]) < np.median(residuals[between]) \
                - margin * times.mean():
            return step
    return 1
