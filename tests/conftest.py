"""The fixtures of the pipeline's test suite (the helpers they use: tests/helpers.py).

- `demo_animals` makes a tiny `<class>/*.jpg` folder of synthetic cats and dogs.
- `pipeline` (session-scoped) splits, trains (1 epoch, 32 px, TRAIN_FLAGS), prunes
  and distills once for the whole run (`built_once`: the test processes share it); later
  tests reuse its checkpoints instead of training again.

The tests come in levels, a folder each: library/ (the package's functions),
scripts/ (each script's command line), end_to_end/ (stages one after another).
"""
import fcntl
import json
import os
import shutil
import types

# Three test processes (the README's pytest -n 3 --dist loadscope: a module's tests in one
# process, which builds its module fixtures once, except INDEPENDENT's): each, and the
# scripts it starts, computes on one thread, so that they share the cores instead of
# fighting over them (two torch processes of two threads each on two cores slow each
# other ~2.8x); the third fills the time the others wait (NNI's manager, a tuner's
# patience). Set before torch is first imported (helpers imports it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from xdist.scheduler import LoadScopeScheduling  # noqa: E402

from helpers import (TRAIN_FLAGS, Pipeline, generate_demo, load_script,  # noqa: E402
                     run_in_process, small_checkpoint)  # (tests/, on pythonpath)

# fixtures that train, prune or distil for real: every test that uses one is slow
SLOW_FIXTURES = {"pipeline", "runs", "pruned", "pruned_by", "narrow_teacher"}


def pytest_collection_modifyitems(items):
    """Mark `slow` each test that uses a fixture of SLOW_FIXTURES (or one built on one)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# Modules whose tests share no module fixture, each a long run of its own (an NNI
# experiment, a torchrun, a script against a full disk): under -n they are not kept in
# one process, so that they wait (on NNI, on a tuner's patience) side by side.
INDEPENDENT = {"tests/end_to_end/test_experiment_failures.py",
               "tests/end_to_end/test_faults.py", "tests/end_to_end/test_distributed.py"}


class ModuleScheduling(LoadScopeScheduling):
    """xdist's --dist loadscope (a module's tests in one process), except for the modules
    of INDEPENDENT, each of whose tests goes alone to whichever process is free. (Its
    loadgroup, which would say this with marks, groups nothing under pytest 9.2:
    pytest-xdist issue 1386.)"""

    def _split_scope(self, nodeid):
        module = nodeid.split("::", 1)[0]
        return nodeid if module in INDEPENDENT else super()._split_scope(nodeid)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadscope":
        return ModuleScheduling(config, log)


def built_once(tmp_path_factory, name, build):
    """The folder NAME that `build(folder)` fills, built once per test run: the test
    processes of pytest -n share it (the first to ask builds it, the others wait for it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # (the run's folder, above the workers')
    folder, done = shared / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # (a process that failed building it)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


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
    def build(folder):
        run = Pipeline(folder)
        generate_demo(run.path("photos"), per_class=12)
        run.run("split", "split_dataset.py", "--source", "photos")
        run.run("train", "train.py", *TRAIN_FLAGS, "--epochs", 1, "--batch-size", 8,
                "--workers", 0)
        run.run("prune", "pruner.py")
        run.run("distill", "knowledge_distillation.py", "--epochs", 1, "--batch-size", 8,
                "--workers", 0)
        outputs = {stage: {"returncode": proc.returncode, "stdout": proc.stdout,
                           "stderr": proc.stderr} for stage, proc in run.procs.items()}
        (folder / "stages.json").write_text(json.dumps(outputs))

    run = Pipeline(built_once(tmp_path_factory, "pipeline", build))
    for stage, output in json.loads(run.path("stages.json").read_text()).items():
        run.procs[stage] = types.SimpleNamespace(**output)
    return run


@pytest.fixture(scope="session")
def narrow_teacher(tmp_path_factory):
    """A folder with a split of demo pictures (dataset/) and a dense model for them
    (vgg16Net.pth: helpers.NARROW, untrained, 32 px): what a sweep starts from, its
    students about 90x cheaper to prune, distil, export and time than those of the
    pipeline's VGG16 (the sweep's tests are about the sweep, not about the teacher)."""
    def build(folder):
        generate_demo(folder / "photos", per_class=12)
        split = run_in_process(load_script("split_dataset"), "--source", "photos", cwd=folder)
        assert split.returncode == 0, split.stderr
        small_checkpoint(folder / "vgg16Net.pth")

    return built_once(tmp_path_factory, "teacher", build)
