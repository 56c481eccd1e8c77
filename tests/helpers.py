"""What the tests share, written once: tiny picture folders, real checkpoints, running a
script through its real command line, a free port, and the checks every level makes.

- `run_script(name, *args, cwd=...)` runs one pipeline script in its own process and
  returns the CompletedProcess (text stdout/stderr); `run_in_process()` runs a loaded
  script's `main` through its real CLI edge in this process (no interpreter start).
- `generate_demo()` draws synthetic cats and dogs; `toy_pictures()` dark and light
  noise a model learns in a few epochs; `small_checkpoint()` writes a real pipeline
  checkpoint of a narrow VGG16 (a few MB).
- `tree_digest()` / `files_under()`: what is on disk, for "left unchanged" checks;
  `assert_clean_error()`: exit status, one line, no traceback.
- `free_port()`: a port nothing listens on; `Pipeline`: one pipeline run's folder.
- NNI experiments' tests: `NNI_TINY` (the flags of a tiny experiment), `local_config()`,
  `nni_env()`, `processes_of()` (what is left running), `port_is_free()`.
"""
import contextlib
import hashlib
import json
import importlib.util
import io
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

import make_demo_data  # tools/, on pytest's pythonpath (pytest.ini)

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"

IMAGE_SIZE = 32  # the smallest size VGG's five 2x2 max-pools accept
# train.py --classifier-width of the runs here: VGG16's real convolutions under a narrow
# head, 16.3M parameters instead of 134M (a training step at 32 px 3x faster, a
# checkpoint 65 MB instead of 512 MB)
CLASSIFIER_WIDTH = 64
TRAIN_FLAGS = ["--image-size", IMAGE_SIZE, "--classifier-width", CLASSIFIER_WIDTH]


def run_script(name, *args, cwd, timeout=600, env=None):
    """Run REPO/<name> (e.g. 'train.py') with `args` in `cwd`, `env` added to the
    environment; never raises on failure."""
    env = dict(os.environ, **{key: str(value) for key, value in (env or {}).items()})
    env.pop("PYTHONWARNINGS", None)  # see the warnings a user would see
    return subprocess.run([sys.executable, str(REPO / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_in_process(module, *args, cwd):
    """Run a loaded script's `main` through its real CLI edge (`run_cli`) in this process.

    Saves the ~4 s a fresh interpreter spends importing torch; returns an object
    with returncode/stdout/stderr like subprocess.run's.
    """
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.run_cli(module.main, module.get_args_parser(), [str(a) for a in args])
            except SystemExit as exit:  # argparse rejecting a flag
                code = exit.code
    finally:
        os.chdir(previous)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def load_script(name):
    """Import REPO/<name>.py as a module (test.py clashes with the stdlib `test` package)."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_demo(dest, per_class=10, size=IMAGE_SIZE, seed=0):
    """Synthetic cats and dogs: dest/cat/cat_0000.jpg ..., dest/dog/dog_0000.jpg ..."""
    make_demo_data.generate(dest, per_class=per_class, size=size, seed=seed)
    return Path(dest)


# A narrow VGG16 (as a pruner could leave it): real pipeline checkpoints of a few MB.
NARROW = {"arch": "vgg16", "batch_norm": False, "num_classes": 2,
          "features": [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M",
                       32, 32, 32, "M"],
          "classifier": [64, 64]}
# A quarter of VGG16's widths: wide enough for the kernels' width step (16) to leave a
# latency allocation room below a uniform cut, with a sixteenth of its convolutions' work.
MEDIUM = {**NARROW, "features": [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M",
                                 128, 128, 128, "M"]}


def small_checkpoint(path, kind="dense", class_names=("cat", "dog"), image_size=IMAGE_SIZE,
                     architecture=NARROW):
    """A pipeline checkpoint (checkpoints.make_checkpoint + atomic_save) of an untrained
    model of `architecture` (NARROW unless said)."""
    import torch

    import model as vgg
    from compress import checkpoints
    from compress.data.images import ORIGINAL_NORMALIZATION

    torch.manual_seed(0)
    model = vgg.from_architecture(architecture)
    checkpoint = checkpoints.make_checkpoint(model, kind, "vgg16", class_names, image_size,
                                             ORIGINAL_NORMALIZATION, {"val_accuracy": 0.5})
    checkpoints.atomic_save(checkpoint, str(path))
    return Path(path)


class CreatesFileWhenUnpickled:
    """A pickle that, if ever unpickled, creates the file `path` (stands in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tree_digest(folder):
    """{relative path: sha256 of the bytes} of every file, plus every folder as '<dir>'."""
    folder = Path(folder)
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        digest[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def files_under(folder):
    """Relative paths of the files under `folder`, as a sorted list."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_clean_error(proc, *names, status=2):
    """Exit `status` (2: the user's mistake), one line on stderr naming each of `names`, and
    no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{proc.stderr}"
    assert "error" in lines[0], lines[0]
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def toy_pictures(folder, per_class, seed):
    """dark/ and light/ noise pictures: brightness alone tells the class."""
    rng = np.random.default_rng(seed)
    for name, low, high in (("dark", 0, 110), ("light", 145, 255)):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(low, high, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}_{index:03d}.png")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pipeline:
    """The folder of one pipeline run and the CompletedProcess of each stage."""

    def __init__(self, root):
        self.root = Path(root)
        self.procs = {}

    def path(self, name):
        return self.root / name

    def run(self, stage, script, *args):
        proc = run_script(script, *args, cwd=self.root)
        self.procs[stage] = proc
        assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc


# --- NNI experiments (tests/end_to_end/test_experiment*.py) ------------------------------

# (--target pytorch: the trials are timed as checkpoints, not exported: these tests are about
# NNI's running of them; test_sweep.py holds what shipping decides)
NNI_TINY = ["--engine", "nni", "--kd-epochs", 2, "--batch-size", 8, "--workers", 0,
            "--repeats", 2, "--max-repeats", 3, "--max-drop", 100, "--target", "pytorch",
            "--sparsities", 0.5, 0.8]


def port_is_free(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_of(folder):
    """Processes whose command line names `folder` (trials) or its experiment (NNI's
    manager and tuner name the experiment's folder or ID)."""
    folder = str(folder)
    ids = []
    state = Path(folder) / "experiment.json"
    if state.exists():
        ids.append(json.loads(state.read_text())["id"])
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and (folder in line or any(i in line for i in ids)):
            found.append(line)
    return found


def nni_env(home, **more):
    return {"HOME": home, **more}


def local_config(folder):
    """An --nni-config for this machine whose assessor waits for 99 epochs: the tiny
    model's accuracies are noise, and a trial the assessor stopped would not finish."""
    path = Path(folder) / "local.yml"
    path.write_text("trainingService:\n  platform: local\nassessor:\n  name: Medianstop\n"
                    "  classArgs:\n    optimize_mode: maximize\n    start_step: 99\n")
    return path
