"""Specification of tools/demo.py: --help explains and starts nothing, --photos DIR says what
it will run and about how long before it starts, and a bad folder is one line."""
import importlib.util

import pytest

from helpers import TOOLS, assert_clean_error, generate_demo, run_in_process

spec = importlib.util.spec_from_file_location("demo_tool", TOOLS / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def test_help_explains_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "WORKDIR", str(tmp_path / "demo"))
    proc = run_in_process(demo, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--photos DIR" in proc.stdout
    assert not (tmp_path / "demo").exists() and list(tmp_path.iterdir()) == []


def test_a_missing_photo_folder_is_one_line(tmp_path):
    assert_clean_error(run_in_process(demo, "--photos", "nowhere", cwd=tmp_path),
                       "--photos nowhere", "folder not found")


def test_a_photo_folder_of_one_class_is_one_line(tmp_path):
    generate_demo(tmp_path / "photos", per_class=2)
    (tmp_path / "photos" / "dog").rename(tmp_path / "dog")
    assert_clean_error(run_in_process(demo, "--photos", "photos", cwd=tmp_path),
                       "at least two class sub-folders")


def test_plan_and_workdir_need_photos(tmp_path):
    assert_clean_error(run_in_process(demo, "--plan", cwd=tmp_path), "--plan: only with --photos")


def test_plan_says_what_will_run_and_how_long_and_runs_nothing(tmp_path, monkeypatch):
    shares = []  # (the speeds measured here: 1000 training, 3000 answering pictures/s)

    def speeds(widths_share, steps=3):
        shares.append(widths_share)
        return 1000 / widths_share ** 2, 3000 / widths_share ** 2

    monkeypatch.setattr(demo, "speeds", speeds)
    generate_demo(tmp_path / "photos", per_class=5)
    proc = run_in_process(demo, "--photos", "photos", "--plan", "--workdir", "run",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "10 pictures of 2 classes (cat 5, dog 5)" in proc.stdout
    for stage in ("1. split", "2. train the dense teacher", "3. sweep and pick", "4. compare"):
        assert stage in proc.stdout
    assert "--test-ratio 0.2" in proc.stdout and "In all about" in proc.stdout
    assert "--kd-epochs " + " ".join(map(str, demo.KD_STAGES)) in proc.stdout
    assert sorted(round(share, 6) for share in shares) == \
        sorted([1.0, *(round(1 - s, 6) for s in demo.SPARSITIES)])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("unit, amp, said", [
    (None, False, "fp32 (this CPU computes no bfloat16)"),
    ("AVX512-BF16", False, "fp32; --amp would train under bf16 autocast on its AVX512-BF16"),
    ("AMX (amx_bf16)", True, "--amp: bf16 autocast on its AMX (amx_bf16)"),
    (None, True, "--amp ignored: this CPU computes no bfloat16, fp32")])
def test_the_plan_says_what_amp_does_on_this_cpu(tmp_path, monkeypatch, unit, amp, said):
    monkeypatch.setattr(demo, "speeds", lambda share, steps=3: (100.0, 300.0))
    monkeypatch.setattr(demo, "native_bf16", lambda: unit)
    generate_demo(tmp_path / "photos", per_class=5)
    proc = run_in_process(demo, "--photos", "photos", "--plan", *(["--amp"] if amp else []),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert said in proc.stdout
    assert ("--amp" in proc.stdout.split("python train.py")[1].splitlines()[0]) == amp


@pytest.mark.slow  # (a few training steps of a VGG16 with a tenth of its widths)
def test_training_and_answering_speeds_are_measured_on_this_machine():
    training, answering = demo.speeds(0.1, steps=1)
    assert 0 < training < answering < float("inf")
