"""The fixtures of the pipeline's test suite (the helpers they use: tests/helpers.py).

- `demo_animals` makes a tiny `<class>/*.jpg` folder of synthetic cats and dogs.
- `pipeline` (session-scoped) splits, trains (1 epoch, 32 px, TRAIN_FLAGS), prunes
  and distills once; later tests reuse its checkpoints instead of training again.

The tests come in levels, a folder each: library/ (the package's functions),
scripts/ (each script's command line), end_to_end/ (stages one after another).
"""
import os

# Two tests at a time (pytest -n 2): each process, and the scripts it starts, computes on
# one thread, so that the two share the cores instead of fighting over them (two torch
# processes of two threads each on two cores slow each other ~2.8x). Set before torch is
# first imported (helpers imports it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import TRAIN_FLAGS, Pipeline, generate_demo  # noqa: E402  (tests/, on pythonpath)

# fixtures that train, prune or distil for real: every test that uses one is slow
SLOW_FIXTURES = {"pipeline", "runs", "pruned", "pruned_by"}


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
