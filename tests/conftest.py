"""The fixtures of the pipeline's test suite (the helpers they use: tests/helpers.py).

- `demo_animals` makes a tiny `<class>/*.jpg` folder of synthetic cats and dogs.
- `pipeline` (session-scoped) splits, trains (1 epoch, 32 px, TRAIN_FLAGS), prunes
  and distills once; later tests reuse its checkpoints instead of training again.

The tests come in levels, a folder each: library/ (the package's functions),
scripts/ (each script's command line), end_to_end/ (stages one after another).
"""
import os

# Three test processes (the README's pytest -n 3 --dist loadscope: a module's tests in one
# process, which builds its module fixtures once): each, and the scripts it starts,
# computes on one thread, so that they share the cores instead of fighting over them (two
# torch processes of two threads each on two cores slow each other ~2.8x); the third
# fills the time the others wait (NNI's manager, a tuner's patience). Set before torch is
# first imported (helpers imports it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import (TRAIN_FLAGS, Pipeline, generate_demo, load_script,  # noqa: E402
                     run_in_process, small_checkpoint)  # (tests/, on pythonpath)

# fixtures that train, prune or distil for real: every test that uses one is slow
SLOW_FIXTURES = {"pipeline", "runs", "pruned", "pruned_by", "narrow_teacher"}


def pytest_collection_modifyitems(items):
    """Mark `slow` each test that uses a fixture of SLOW_FIXTURES (or one built on one)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def demo_animals(tmp_path):
    """tmp_path/photos/{cat,dog}/*.jpg: 10 synthetic 32 px pictures per class."""
    return generate_demo(tmp_path / "photos", per_class=10)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Demo data -> split -> train (1 epoch, 32 px, narrow head) -> prune -> distill (1 epoch),
    once.

    Tests may read its files but must not change them; test.py runs that write
    beside the checkpoints belong to test_end_to_end.py.
    """
    run = Pipeline(tmp_path_factory.mktemp("pipeline"))
    generate_demo(run.path("photos"), per_class=12)
    run.run("split", "split_dataset.py", "--source", "photos")
    run.run("train", "train.py", *TRAIN_FLAGS, "--epochs", 1, "--batch-size", 8, "--workers", 0)
    run.run("prune", "pruner.py")
    run.run("distill", "knowledge_distillation.py", "--epochs", 1, "--batch-size", 8,
            "--workers", 0)
    return run


@pytest.fixture(scope="session")
def narrow_teacher(tmp_path_factory):
    """A folder with a split of demo pictures (dataset/) and a dense model for them
    (vgg16Net.pth: helpers.NARROW, untrained, 32 px): what a sweep starts from, its
    students about 90x cheaper to prune, distil, export and time than those of the
    pipeline's VGG16 (the sweep's tests are about the sweep, not about the teacher)."""
    folder = tmp_path_factory.mktemp("teacher")
    generate_demo(folder / "photos", per_class=12)
    split = run_in_process(load_script("split_dataset"), "--source", "photos", cwd=folder)
    assert split.returncode == 0, split.stderr
    small_checkpoint(folder / "vgg16Net.pth")
    return folder
