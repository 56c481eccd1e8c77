"""Specification of compress.measure.profiling: where a model's time goes, layer by layer.

The models are narrow VGG16s (helpers.NARROW) and a MobileNetV2 on the CPU; the .onnx
files are exported and quantised here as export.py does. The timed one is four times
as wide as the narrow VGG, at 96 px: the narrow one at 32 px takes a few microseconds a
layer in onnxruntime, the resolution of its profiler, and at 64 or 96 px and batch 1 it
spent 17-22% of its pass between its layers, in onnxruntime and in PyTorch alike
(measured: the profile reports it as time outside every layer).
"""
import pytest
import torch

import model as vgg
from compress.checkpoints import atomic_save, load_checkpoint, make_checkpoint
from compress.data.images import ORIGINAL_NORMALIZATION
from compress.export import convert, onnx_files
from compress.measure import profiling
from compress.measure.evaluation import count_flops
from helpers import IMAGE_SIZE, NARROW

# real models timed and profiled, the machine's peak measured: alone, not beside another test
pytestmark = [pytest.mark.slow, pytest.mark.serial]

CPU = torch.device("cpu")
TIMED_SIZE = 96
WIDER = dict(NARROW, features=[4 * w if w != "M" else w for w in NARROW["features"]])
MOBILENET = {"arch": vgg.MOBILENET_V2, "batch_norm": True, "num_classes": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{runtime: (path, description or checkpoint, model)} of one VGG16 of the WIDER widths:
    the checkpoint, its fp32 and its int8 ONNX file."""
    folder = tmp_path_factory.mktemp("profiling")
    path = str(folder / "wider.pth")
    model = vgg.from_architecture(WIDER).eval()
    atomic_save(make_checkpoint(model, "dense", "vgg16", ["cat", "dog"], TIMED_SIZE,
                                ORIGINAL_NORMALIZATION, {}), path)
    checkpoint = load_checkpoint(path)
    fp32, int8 = str(folder / "wider.onnx"), str(folder / "wider.int8.onnx")
    convert.export_onnx(model, fp32, onnx_files.describe(checkpoint, path, "-"))
    calibration = [torch.randn(8, 3, TIMED_SIZE, TIMED_SIZE, generator=torch.Generator()
                               .manual_seed(index)) for index in range(2)]
    convert.quantize_int8(fp32, int8, calibration, "avx2")
    return {"torch": (path, checkpoint, model),
            **{name: (file, *onnx_files.load_onnx(file)) for name, file in
               (("onnx", fp32), ("int8", int8))}}


@pytest.mark.parametrize("runtime", ["torch", "onnx", "int8"])
@pytest.mark.parametrize("batch", [1, 32])
def test_the_layer_times_add_up_to_the_measured_latency(files, runtime, batch):
    path, checkpoint, model = files[runtime]
    profile = profiling.profile_model(runtime, path, checkpoint, model, batch, runs=10)
    assert profile.measured > 0 and profile.profiled > 0
    # what no compute layer took is "other": the layers add up to the pass
    assert profile.seconds() == pytest.approx(profile.measured, rel=1e-9), profile
    names = [layer.name for layer in profile.layers]
    assert names == [*(f"conv{i}" for i in range(1, 14)), "fc1", "fc2", "fc3", "other"]
    assert all(layer.seconds > 0 for layer in profile.layers)


def test_multiply_adds_are_what_nni_counts_as_flops():
    for architecture in (NARROW, dict(NARROW, batch_norm=True), MOBILENET):
        model = vgg.from_architecture(architecture).eval()
        counted = profiling.multiply_adds(model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        assert sum(counted.values()) == count_flops(model, IMAGE_SIZE)[0]


def test_a_layer_holds_its_convolution_batch_norm_and_activation():
    model = vgg.from_architecture(dict(NARROW, batch_norm=True))
    plan = profiling.layer_plan(model, dict(NARROW, batch_norm=True))
    name, kind, modules = plan[0]
    assert (name, kind) == ("conv1", "conv 3x3")
    assert [type(m).__name__ for m in modules] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert {type(m).__name__ for m in plan[-1][2]} == {"MaxPool2d", "AdaptiveAvgPool2d",
                                                        "Dropout"}


def test_mobilenet_v2s_layers_by_kind():
    plan = profiling.layer_plan(vgg.from_architecture(MOBILENET), MOBILENET)
    kinds = [kind for _, kind, _ in plan]
    assert (kinds.count("depthwise 3x3"), kinds.count("pointwise 1x1"),
            kinds.count("conv 3x3"), kinds.count("linear")) == (17, 34, 1, 1)


def test_the_machines_peak_is_measured_for_fp32_and_int8():
    peak = profiling.machine_peak(repeats=2)
    assert set(peak) == {"fp32", "int8"} and all(value > 1 for value in peak.values())
