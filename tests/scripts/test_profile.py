"""Specification of test.py --profile: where each model's time goes, and why one is faster.

A narrow VGG16 (helpers.NARROW) at 64 px and the same pruned by half, through the real
command line, in this process.
"""
import json
import re

import pytest
import torch

from compress.checkpoints import atomic_save, load_checkpoint
from compress.pruning.channels import Pruning, prune_checkpoint
from helpers import assert_clean_error, load_script, run_in_process, small_checkpoint

# real models exported, timed and profiled: alone, not beside another test
pytestmark = [pytest.mark.slow, pytest.mark.serial]

test_py = load_script("test")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    dense = str(small_checkpoint(folder / "dense.pth", image_size=64))
    pruned, _ = prune_checkpoint(load_checkpoint(dense), dense, Pruning(sparsity=0.5))
    atomic_save(pruned, str(folder / "pruned.pth"))
    proc = run_in_process(test_py, "--profile", "dense.pth", "pruned.pth", cwd=folder)
    return folder, proc


def test_profile_names_the_cpu_and_its_peak_measured_in_the_same_run(profiled):
    _, proc = profiled
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^CPU: .*int8 class \w.*; peak [\d.]+ GMAC/s fp32 .*, [\d.]+ GMAC/s int8",
                     proc.stdout, re.MULTILINE), proc.stdout


def test_profile_gives_every_layer_its_time_and_share_of_the_peak(profiled):
    _, proc = profiled
    for batch in (1, 32):
        assert f"dense.pth (dense.pth; torch, fp32, batch {batch}, 64 px)" in proc.stdout
    for layer in ("conv1", "conv13", "fc1", "fc3"):
        assert re.search(rf"^{layer} +conv 3x3|^{layer} +linear", proc.stdout, re.MULTILINE)
    assert re.search(r"^all conv 3x3 +13 layers +[\d.]+ +\d+% +[\d.]+ +[\d.]+ +[\d.]+%",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert "outside every layer" in proc.stdout


def test_profile_says_why_each_model_is_faster_than_the_first(profiled):
    _, proc = profiled
    for batch in (1, 32):
        assert re.search(rf"^- pruned.pth vs dense.pth, batch {batch}: "
                         r"[\d.]+x fewer multiply-adds, "
                         r"[\d.]+x faster\. Its compute layers run at [\d.]+ GMAC/s",
                         proc.stdout, re.MULTILINE), proc.stdout


def test_profile_writes_its_numbers_and_its_figure(profiled):
    folder, _ = profiled
    report = json.loads((folder / "profile.json").read_text())
    assert set(report) == {"cpu", "threads", "peak_gmacs", "profiles"}
    assert [(p["name"], p["batch"]) for p in report["profiles"]] == [
        ("dense.pth", 1), ("pruned.pth", 1), ("dense.pth", 32), ("pruned.pth", 32)]
    for profile in report["profiles"]:  # (how well they add up: tests/library/test_profiling)
        assert len(profile["layers"]) == 17 and profile["measured"] > 0
        assert {"name", "kind", "seconds", "macs"} <= set(profile["layers"][0])
    assert (folder / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_foreign_onnx_file_is_one_line(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "foreign.onnx"),
                      dynamo=True)
    proc = run_in_process(test_py, "--profile", "foreign.onnx", cwd=tmp_path)
    assert_clean_error(proc, "foreign.onnx", "not written by export.py")


def test_profile_runs_on_the_cpu_only(tmp_path):
    small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(test_py, "--profile", "dense.pth", "--device", "cuda", cwd=tmp_path)
    assert_clean_error(proc, "--device cuda", "on the CPU")
