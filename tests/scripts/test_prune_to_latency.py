"""Specification of pruner.py --latency / --speedup: per-layer widths for a time on this CPU,
the report beside the uniform sparsity of the same predicted latency, and one-line
refusals. The latency model is written into the cache by hand here (what building one
measures is tests/library/test_allocation.py's), so the widths it must give are known.
"""
import json

import pytest
import torch

from compress.pruning import latency
from helpers import (IMAGE_SIZE, NARROW, assert_clean_error, load_script, run_in_process,
                     small_checkpoint)

pruner = load_script("pruner")
GROUPS = ("conv32", "conv16", "conv8", "conv4", "conv2", "linear")


@pytest.fixture
def cached_model(tmp_path, monkeypatch):
    """A dense checkpoint in tmp_path and a hand-made int8 latency model of it in the cache:
    every multiply-add costs the same, the 8x8 convolutions' twenty times as much."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    small_checkpoint(tmp_path / "vgg16Net.pth")
    coefficients = {group: [1e-6 * (20 if group == "conv8" else 1), 0.0, 0.0]
                    for group in GROUPS}
    model = latency.LatencyModel(latency.key_of(NARROW, IMAGE_SIZE, "int8", 1), coefficients,
                                 [0.0, 0.0], steps=[[8, 0.1], [9, 0.2]], step=1)
    path = latency.cache_path(model.key)
    (tmp_path / "cache" / "vgg-prune-distill" / "latency").mkdir(parents=True)
    model.save(path)
    return model


@pytest.fixture
def measured(monkeypatch):
    """Measuring a model's latency (an ONNX export) replaced by the hand-made model's own
    prediction: the report's 'measured' column then equals the predicted one."""
    calls = []

    def fake(architecture, image_size, runtime, batch):
        calls.append(architecture)
        return latency.cached(NARROW, IMAGE_SIZE, runtime, batch).predict(architecture)
    monkeypatch.setattr(pruner, "measure", fake)
    return calls


def test_latency_gives_per_layer_widths_within_the_target(tmp_path, cached_model, measured):
    target = cached_model.predict(NARROW) / 3
    proc = run_in_process(pruner, "--latency", f"{target:.6f}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pruned = torch.load(tmp_path / "pruned_vgg16_net.pth", weights_only=True)
    widths = latency.widths_of(pruned["architecture"])
    assert cached_model.predict(pruned["architecture"]) <= target
    # the time sits in the 8x8 convolutions (conv5-7): channels are taken there, and from
    # the layer that feeds them (what it saves includes conv5's time); where little time
    # sits (the 4x4 and 2x2 maps, the hidden layers) every channel stays
    dense = latency.widths_of(NARROW)
    thinned = {name for name in dense if widths[name] < dense[name]}
    assert thinned & {"features.10", "features.12", "features.14"}
    assert thinned <= {"features.7", "features.10", "features.12", "features.14"}
    # the report: widths beside the uniform sparsity of the same latency, both measured
    assert "allocated" in proc.stdout and "uniform 0." in proc.stdout
    assert len(measured) == 2 and "ms measured" in proc.stdout


def test_speedup_is_against_the_dense_models_predicted_time(tmp_path, cached_model, measured):
    proc = run_in_process(pruner, "--speedup", 4, "--output", "fast.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pruned = torch.load(tmp_path / "fast.pth", weights_only=True)
    assert cached_model.predict(pruned["architecture"]) <= cached_model.predict(NARROW) / 4
    assert f"target {cached_model.predict(NARROW) / 4:.2f} ms" in proc.stdout


def test_a_latency_no_widths_reach_is_one_line(tmp_path, cached_model, measured):
    proc = run_in_process(pruner, "--latency", 1e-6, cwd=tmp_path)
    assert_clean_error(proc, "--latency 1e-06", "below what any allowed widths reach")
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


def test_a_latency_above_the_dense_models_is_one_line(tmp_path, cached_model, measured):
    proc = run_in_process(pruner, "--latency", 1000, cwd=tmp_path)
    assert_clean_error(proc, "--latency 1000", "the dense model already takes")


@pytest.mark.parametrize("flags, named", [(["--latency", 1, "--speedup", 2], "--latency"),
                                          (["--latency", 1, "--sparsity", 0.5], "--sparsity"),
                                          (["--speedup", 2, "--global"], "--global")])
def test_one_target_at_a_time(tmp_path, flags, named):
    small_checkpoint(tmp_path / "vgg16Net.pth")
    assert_clean_error(run_in_process(pruner, *flags, cwd=tmp_path), named)


def test_the_cache_is_keyed_by_what_the_time_depends_on(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths = {latency.cache_path(latency.key_of(NARROW, size, runtime, batch))
             for size in (32, 64) for runtime in ("int8", "pytorch") for batch in (1, 32)}
    assert len(paths) == 8 and all(str(tmp_path) in path for path in paths)
    model = latency.LatencyModel(latency.key_of(NARROW, 32, "int8", 1),
                                 {g: [0, 0, 0] for g in GROUPS}, [1.0, 0.0])
    model.save(latency.cache_path(model.key))
    assert latency.cached(NARROW, 32, "int8", 1) == model
    assert latency.cached(NARROW, 64, "int8", 1) is None
    saved = json.loads(open(latency.cache_path(model.key)).read())["key"]
    assert saved["cpu"] and saved["threads"] == torch.get_num_threads()
