"""Specification of tools/make_demo_data.py, the synthetic cat/dog generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_demo_data as mdd
from compress.cli import UserError
from helpers import TOOLS

SCRIPT = TOOLS / "make_demo_data.py"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=120)


def files_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float arrays (N, H, W, 3) in [0, 1] and labels (0=cat, 1=dog)."""
    xs, ys = [], []
    for label, kind in enumerate(mdd.CLASSES):
        for p in sorted((root / kind).glob("*.jpg")):
            xs.append(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def split(n: int, frac: float = 0.7, seed: int = 0):
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * frac)
    return order[:cut], order[cut:]


@pytest.fixture(scope="module")
def dataset_48(tmp_path_factory) -> Path:
    """200 images per class at 48 px, shared by the learnability tests."""
    root = tmp_path_factory.mktemp("demo48") / "demo"
    mdd.generate(root, per_class=200, size=48, seed=123)
    return root


# --------------------------------------------------------------------------
# layout, formats, determinism
# --------------------------------------------------------------------------

def test_generates_requested_counts_as_rgb_jpegs(tmp_path):
    dest = tmp_path / "demo"
    counts = mdd.generate(dest, per_class=5, size=40, seed=1)

    assert counts == {"cat": 5, "dog": 5}
    assert sorted(p.name for p in dest.iterdir()) == [".demo_data", "cat", "dog"]
    assert (dest / ".demo_data").read_text().count("\n") == 1
    for kind in ("cat", "dog"):
        names = sorted(p.name for p in (dest / kind).iterdir())
        assert names == [f"{kind}_{i:04d}.jpg" for i in range(5)]
        for name in names:
            with Image.open(dest / kind / name) as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (40, 40)


def test_draw_animal_returns_rgb_image_of_requested_size():
    img = mdd.draw_animal("dog", 64, np.random.default_rng(0))
    assert img.mode == "RGB" and img.size == (64, 64)
    with pytest.raises(ValueError):
        mdd.draw_animal("horse", 64, np.random.default_rng(0))


def test_same_seed_gives_identical_files(tmp_path):
    mdd.generate(tmp_path / "a", per_class=4, size=48, seed=7)
    mdd.generate(tmp_path / "b", per_class=4, size=48, seed=7)
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")


def test_different_seed_gives_different_files(tmp_path):
    mdd.generate(tmp_path / "a", per_class=4, size=48, seed=7)
    mdd.generate(tmp_path / "b", per_class=4, size=48, seed=8)
    a, b = files_bytes(tmp_path / "a"), files_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != b[k] for k in images)


def test_more_images_per_class_keeps_the_earlier_ones(tmp_path):
    mdd.generate(tmp_path / "small", per_class=3, size=48, seed=5)
    mdd.generate(tmp_path / "large", per_class=6, size=48, seed=5)
    small, large = files_bytes(tmp_path / "small"), files_bytes(tmp_path / "large")
    assert all(large[k] == v for k, v in small.items())


def test_cli_writes_images_and_prints_one_summary_line(tmp_path):
    dest = tmp_path / "demo"
    res = run_cli("--dest", str(dest), "--per-class", "3", "--size", "32",
                  "--seed", "2", "--quality", "80")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "6" in lines[0] and str(dest.resolve()) in lines[0]
    assert len(list(dest.rglob("*.jpg"))) == 6


def test_cli_help_describes_options():
    res = run_cli("--help")
    assert res.returncode == 0
    for opt in ("--dest", "--per-class", "--size", "--seed", "--quality"):
        assert opt in res.stdout


# --------------------------------------------------------------------------
# safety: only ever writes into its own folder
# --------------------------------------------------------------------------

def assert_clean_refusal(res: subprocess.CompletedProcess, folder: Path):
    assert res.returncode == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in res.stderr
    assert str(folder) in err or folder.name in err


def test_refuses_non_empty_folder_without_marker(tmp_path):
    photos = tmp_path / "my_photos"
    photos.mkdir()
    precious = photos / "holiday.jpg"
    precious.write_bytes(b"\xff\xd8 not really a jpeg \x00\x01")
    before = precious.read_bytes()

    res = run_cli("--dest", str(photos), "--per-class", "2", "--size", "32")

    assert_clean_refusal(res, photos)
    assert precious.read_bytes() == before
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]


def test_refuses_animals_folder(tmp_path):
    animals = tmp_path / "animals"
    res = run_cli("--dest", str(animals), "--per-class", "2", "--size", "32")
    assert_clean_refusal(res, animals)
    assert not animals.exists()

    # ... even when it already carries a marker, and through the Python API
    animals.mkdir()
    (animals / ".demo_data").write_text("generated\n")
    with pytest.raises(UserError):
        mdd.generate(animals, per_class=1, size=32)
    assert [p.name for p in animals.iterdir()] == [".demo_data"]


def test_refuses_folder_directly_inside_animals(tmp_path):
    """It would look like an extra class to the training pipeline."""
    res = run_cli("--dest", str(tmp_path / "animals" / "demo"),
                  "--per-class", "2", "--size", "32")
    assert res.returncode == 2
    assert not (tmp_path / "animals").exists()


def test_refuses_animals_folder_reached_through_a_symlink(tmp_path):
    animals = tmp_path / "animals"
    animals.mkdir()
    link = tmp_path / "demo_link"
    link.symlink_to(animals, target_is_directory=True)
    res = run_cli("--dest", str(link), "--per-class", "2", "--size", "32")
    assert res.returncode == 2
    assert list(animals.iterdir()) == []


def test_empty_existing_folder_is_used(tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    assert mdd.generate(dest, per_class=2, size=32) == {"cat": 2, "dog": 2}
    assert (dest / ".demo_data").is_file()


def test_regenerates_own_folder(tmp_path):
    dest = tmp_path / "demo"
    mdd.generate(dest, per_class=4, size=32, seed=0)
    stale = [dest / "cat" / "stale.jpg", dest / "notes.txt"]
    for p in stale:
        p.write_text("left over")

    res = run_cli("--dest", str(dest), "--per-class", "2", "--size", "32")

    assert res.returncode == 0, res.stderr
    assert not any(p.exists() for p in stale)
    assert (dest / ".demo_data").is_file()
    assert sorted(p.name for p in (dest / "cat").iterdir()) == [
        "cat_0000.jpg", "cat_0001.jpg"]
    assert sorted(p.name for p in (dest / "dog").iterdir()) == [
        "dog_0000.jpg", "dog_0001.jpg"]


# --------------------------------------------------------------------------
# the class is in the shapes, not in the colours
# --------------------------------------------------------------------------

def colour_features(x: np.ndarray) -> np.ndarray:
    """Per-image mean and std of each RGB channel (6 features)."""
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def logistic_regression_accuracy(f: np.ndarray, y: np.ndarray) -> float:
    tr, te = split(len(y))
    mu, sd = f[tr].mean(0), f[tr].std(0) + 1e-8
    xtr, xte = (f[tr] - mu) / sd, (f[te] - mu) / sd
    w, b = np.zeros(f.shape[1]), 0.0
    for _ in range(2000):
        p = 1 / (1 + np.exp(-(xtr @ w + b)))
        g = p - y[tr]
        w -= 0.1 * (xtr.T @ g / len(tr) + 1e-3 * w)
        b -= 0.1 * g.mean()
    return float((((xte @ w + b) > 0).astype(int) == y[te]).mean())


def nearest_neighbour_accuracy(f: np.ndarray, y: np.ndarray) -> float:
    tr, te = split(len(y))
    mu, sd = f[tr].mean(0), f[tr].std(0) + 1e-8
    xtr, xte = (f[tr] - mu) / sd, (f[te] - mu) / sd
    d = ((xte[:, None, :] - xtr[None, :, :]) ** 2).sum(-1)
    return float((y[tr][d.argmin(1)] == y[te]).mean())


def test_mean_colour_classifier_is_near_chance(dataset_48):
    x, y = load_arrays(dataset_48)
    f = colour_features(x)
    assert logistic_regression_accuracy(f, y) <= 0.62
    assert nearest_neighbour_accuracy(f, y) <= 0.62


@pytest.mark.slow  # (a real training)
def test_shape_signal_is_learnable(dataset_48):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    torch.set_num_threads(2)

    x, y = load_arrays(dataset_48)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    x = (x - 0.5) / 0.25
    y = torch.from_numpy(y)
    tr, te = (torch.from_numpy(i) for i in split(len(y)))

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(3, 16), block(16, 32), block(32, 64),
                          block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(12):
        model.train()
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(32):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc >= 0.85, acc
