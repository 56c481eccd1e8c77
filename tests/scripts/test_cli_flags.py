"""Specification of flag values the pipeline cannot work with: each is a user mistake,
so it must end in a one-line error (exit 2, no traceback) before any work is done.

These run the scripts' real CLI edge (`run_cli`) in this process, on tiny data and
a narrow model, so they take a second or two each.
"""
import pytest

from helpers import assert_clean_error, generate_demo, load_script, run_in_process, small_checkpoint


@pytest.fixture
def tiny_dataset(tmp_path):
    """tmp_path/dataset/{train,val}/{cat,dog}/: 2 pictures per class and part."""
    for part in ("train", "val"):
        generate_demo(tmp_path / "dataset" / part, per_class=2)
    return tmp_path / "dataset"


# --- image sizes VGG cannot take ----------------------------------------------
# Five 2x2 max-pools need at least 32 px.

def test_training_at_an_image_size_below_32_is_a_one_line_error(tmp_path, tiny_dataset):
    proc = run_in_process(load_script("train"), "--image-size", 16, "--epochs", 1,
                          "--batch-size", 4, "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "16")
    assert not (tmp_path / "class_indices.json").exists()


def test_pruning_at_an_image_size_below_32_is_a_one_line_error(tmp_path):
    weights = small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(load_script("pruner"), "--weights", weights, "--image-size", 16,
                          cwd=tmp_path)
    assert_clean_error(proc, "16")
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


def test_pruning_at_32_px_is_accepted(tmp_path):
    """The control: the same narrow checkpoint prunes fine at the smallest valid size."""
    weights = small_checkpoint(tmp_path / "dense.pth")
    proc = run_in_process(load_script("pruner"), "--weights", weights, "--image-size", 32,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pruned_vgg16_net.pth").exists()


# --- epoch counts ------------------------------------------------------------------

def test_training_for_zero_epochs_is_a_one_line_error(tmp_path, tiny_dataset):
    proc = run_in_process(load_script("train"), "--image-size", 32, "--epochs", 0,
                          "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "--epochs")


def test_distilling_for_zero_epochs_is_a_one_line_error(tmp_path, tiny_dataset):
    proc = run_in_process(load_script("knowledge_distillation"),
                          "--teacher", small_checkpoint(tmp_path / "t.pth"),
                          "--student", small_checkpoint(tmp_path / "s.pth", kind="pruned"),
                          "--epochs", 0, "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "--epochs")


def test_distillation_refuses_alpha_outside_0_to_1(tmp_path):
    proc = run_in_process(load_script("knowledge_distillation"), "--alpha", 1.5, cwd=tmp_path)
    assert_clean_error(proc, "--alpha")


# --- --help -----------------------------------------------------------------------
# argparse formats every help text with %: a stray "%" in one breaks --help.

@pytest.mark.parametrize("script", ["split_dataset", "train", "pruner", "knowledge_distillation",
                                    "test", "export", "sweep"])
def test_help_explains_every_stage(tmp_path, script):
    module = load_script(script)
    proc = run_in_process(module, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
    assert module.__doc__.splitlines()[0] in proc.stdout
