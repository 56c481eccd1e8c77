"""Specification of compress/machine/resources.py and what the training loop says on a full disk
(the real filesystems, through every stage's command line: tests/end_to_end/test_faults.py)."""
import errno

import pytest

from compress.cli import UserError, is_disk_full
from compress.machine import resources
from compress.training.loop import said_on_full_disk


def test_a_full_disk_is_found_inside_the_error_torch_raises_for_it():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            # (raised during the OSError, as torch's writer does: the chain holds it)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904
    except RuntimeError as error:
        assert is_disk_full(error)
    assert not is_disk_full(RuntimeError("unexpected pos"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_cache_larger_than_the_memory_available_is_refused_with_both_figures():
    with pytest.raises(UserError, match=r"--cache: 9 pictures .* about 3.0 GB of memory, and "
                                        r"this machine has 1.0 GB available"):
        resources.check_memory(3 * 2 ** 30, "9 pictures", "--cache", available=2 ** 30)
    resources.check_memory(2 ** 29, "9 pictures", "--cache", available=2 ** 30)


HISTORY = [{"epoch": 1, "val_accuracy": 0.6}, {"epoch": 2, "val_accuracy": 0.8},
           {"epoch": 3, "val_accuracy": 0.7}]


def test_a_run_whose_best_model_no_longer_fits_says_which_epochs_model_is_kept(tmp_path):
    output = tmp_path / "vgg16Net.pth"
    output.write_bytes(b"the best of epoch 2")
    with pytest.raises(UserError) as refused:
        with said_on_full_disk(str(output), HISTORY, 4):
            raise resources.DiskFull(str(output), 2 ** 20, 0, kept="the file there is as it was")
    message = str(refused.value)
    assert "the disk is full: it needs about 1.0 MB" in message
    assert "stopped after epoch 4" in message
    assert f"{output} keeps the best model so far (epoch 2, val 80.0%)" in message
    assert "make room and run the same command again" in message


def test_a_run_that_saved_nothing_yet_says_so(tmp_path):
    with pytest.raises(UserError, match="no model of this run was saved"):
        with said_on_full_disk(str(tmp_path / "vgg16Net.pth"), [], 1):
            raise resources.DiskFull(str(tmp_path / "vgg16Net.pth"), None, 0, written=5 * 2 ** 20)


def test_a_lock_held_is_refused_and_freed_at_the_end(tmp_path):
    output = tmp_path / "student.pth"
    with resources.output_lock(str(output), "--output"):
        with pytest.raises(UserError, match=r"--output .*student.pth: another run \(process"):
            with resources.output_lock(str(output), "--output"):
                pass
    assert list(tmp_path.iterdir()) == []  # the lock file went with the run
    with resources.output_lock(str(output), "--output"):
        pass
