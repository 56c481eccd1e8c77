"""Specification of split_dataset.py: SOURCE/<class>/* -> DEST/{train,val}/<class>/*."""
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import (assert_clean_error, files_under, generate_demo, load_script, run_in_process,
                     run_script, tree_digest)

split_dataset = load_script("split_dataset")
from compress.data import splitting  # noqa: E402


def split_here(*args, cwd):
    """split_dataset.py's CLI, run in this process (the slow part of a fresh process is
    importing torch); the tests marked 'real CLI' below run it as a subprocess."""
    return run_in_process(split_dataset, *args, cwd=cwd)

JUNK = {  # name in the source -> (class folder, bytes)
    ".DS_Store": ("cat", b"\x00\x00\x00\x01Bud1" + bytes(64)),
    "Thumbs.db": ("dog", b"\xd0\xcf\x11\xe0" + bytes(64)),
    "notes.txt": ("cat", b"the cat photos were taken in May\n"),
    "empty.jpg": ("cat", b""),
}


def split_listing(dest):
    """{'train/cat': [...], 'val/cat': [...], ...} of a split folder."""
    dest = Path(dest)
    return {f"{part}/{c.name}": sorted(p.name for p in c.iterdir())
            for part in ("train", "val") for c in sorted((dest / part).iterdir())}


@pytest.fixture(scope="module")
def messy_split(tmp_path_factory):
    """One split of a realistic, messy source folder, shared by several specifications.

    photos/cat: 10 demo JPEGs, 'my cat 1.jpg', 'same.jpg', .DS_Store, notes.txt, empty.jpg
    photos/dog: 10 demo JPEGs, 'chien été ü.jpg', 'same.jpg', Thumbs.db, truncated.jpg
    -> 12 usable pictures per class, split with --ratio 0.75 (9 train, 3 val each).
    """
    root = tmp_path_factory.mktemp("messy")
    source = generate_demo(root / "photos", per_class=10)
    cat, dog = source / "cat", source / "dog"
    shutil.copy(cat / "cat_0001.jpg", cat / "my cat 1.jpg")
    shutil.copy(dog / "dog_0001.jpg", dog / "chien été ü.jpg")
    shutil.copy(cat / "cat_0002.jpg", cat / "same.jpg")
    shutil.copy(dog / "dog_0002.jpg", dog / "same.jpg")
    for name, (folder, data) in JUNK.items():
        (source / folder / name).write_bytes(data)
    whole = (dog / "dog_0003.jpg").read_bytes()
    (dog / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    before = tree_digest(source)
    proc = run_script("split_dataset.py", "--source", "photos", "--dest", "dataset",
                      "--ratio", "0.75", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "source": source, "dest": root / "dataset", "proc": proc,
            "before": before}


def test_split_never_touches_source_folder(messy_split):
    assert tree_digest(messy_split["source"]) == messy_split["before"]


def test_split_counts_follow_ratio_per_class(messy_split):
    """12 usable pictures a class at 0.75: 9 and 3, give or take the copies kept together
    (each class holds two pairs of copies: the split moves a copy to its pair's part)."""
    listing = split_listing(messy_split["dest"])
    for name in ("cat", "dog"):
        train, val = listing[f"train/{name}"], listing[f"val/{name}"]
        assert len(train) + len(val) == 12 and abs(len(val) - 3) <= 1
        assert not set(train) & set(val)
    counts = {k: len(v) for k, v in listing.items()}
    assert f"train {counts['train/cat']}" in " ".join(messy_split["proc"].stdout.split())


COPIES = {"cat": [("cat_0001.jpg", "my cat 1.jpg"), ("cat_0002.jpg", "same.jpg")],
          "dog": [("chien été ü.jpg", "dog_0001.jpg"), ("dog_0002.jpg", "same.jpg")]}


def test_copies_of_a_photo_land_in_the_same_part_and_are_counted(messy_split):
    listing = split_listing(messy_split["dest"])
    part_of = {(key.split("/")[1], file): key.split("/")[0] for key, files in listing.items()
               for file in files}
    for name, pairs in COPIES.items():
        for first, copy in pairs:
            assert part_of[name, first] == part_of[name, copy], (name, first, copy)
    assert "Found 8 pictures that are copies of another (4 group(s)" in messy_split["proc"].stdout
    summary = json.loads((messy_split["dest"] / splitting.MARKER).read_text())
    assert sorted(map(sorted, summary["copies"])) == sorted(
        sorted(f"{name}/{file}" for file in pair) for name, pairs in COPIES.items()
        for pair in pairs)


def test_a_resized_reencoded_or_recoloured_copy_is_found_and_another_picture_is_not(tmp_path):
    from PIL import Image, ImageEnhance

    photos = generate_demo(tmp_path / "photos", per_class=6, size=128)
    cat = photos / "cat"
    original = Image.open(cat / "cat_0003.jpg")
    original.resize((original.width // 2, original.height // 2)).save(cat / "small.jpg",
                                                                        quality=60)
    ImageEnhance.Color(original).enhance(0.3).save(cat / "faded.png")
    usable, _, hashes = splitting.scan(str(photos), workers=1)
    groups = splitting.duplicate_groups(hashes)
    assert groups == [[("cat", "cat_0003.jpg"), ("cat", "faded.png"), ("cat", "small.jpg")]]


def test_split_copies_every_usable_picture_byte_for_byte(messy_split):
    source, dest = messy_split["source"], messy_split["dest"]
    copied = {}
    for path in dest.glob("*/*/*"):
        copied[f"{path.parent.name}/{path.name}"] = path.read_bytes()
    expected = {f"{c}/{p.name}": p.read_bytes() for c in ("cat", "dog")
                for p in (source / c).iterdir()
                if p.name not in JUNK and p.name != "truncated.jpg"}
    assert copied == expected


def test_split_skips_non_images_and_broken_jpegs_and_names_them(messy_split):
    out = messy_split["proc"].stdout
    assert "Skipped 5 file(s)" in out
    for name in list(JUNK) + ["truncated.jpg"]:
        assert name in out, f"{name} not named in the summary:\n{out}"
    assert "empty file" in out
    assert "not an image" in out
    copied = files_under(messy_split["dest"])
    for name in list(JUNK) + ["truncated.jpg"]:
        assert not any(path.endswith("/" + name) for path in copied), name


def test_split_handles_names_with_spaces_and_non_ascii(messy_split):
    copied = files_under(messy_split["dest"])
    assert sum(p.endswith("/cat/my cat 1.jpg") for p in copied) == 1
    assert sum(p.endswith("/dog/chien été ü.jpg") for p in copied) == 1


def test_same_file_name_in_two_classes_lands_in_each_class(messy_split):
    dest, source = messy_split["dest"], messy_split["source"]
    for name in ("cat", "dog"):
        [copy] = list(dest.glob(f"*/{name}/same.jpg"))
        assert copy.read_bytes() == (source / name / "same.jpg").read_bytes()


def test_split_records_what_it_did_in_its_marker(messy_split):
    summary = json.loads((messy_split["dest"] / splitting.MARKER).read_text())
    assert summary["ratio"] == 0.75 and summary["seed"] == 0
    listing = split_listing(messy_split["dest"])
    assert summary["classes"] == {name: {part: len(listing[f"{part}/{name}"])
                                         for part in ("train", "val")} for name in ("cat", "dog")}
    assert len(summary["skipped"]) == 5


def test_split_leaves_no_temporary_folders(messy_split):
    assert sorted(p.name for p in messy_split["root"].iterdir()) == ["dataset", "photos"]


def test_split_of_uneven_classes_rounds_validation_per_class(tmp_path, demo_animals):
    for index in range(7, 10):
        (demo_animals / "dog" / f"dog_{index:04d}.jpg").unlink()
    proc = split_here("--source", demo_animals, "--ratio", "0.7",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = {k: len(v) for k, v in split_listing(tmp_path / "dataset").items()}
    # cat: 10 * 0.3 = 3 for val; dog: round(7 * 0.3) = 2 for val
    assert counts == {"train/cat": 7, "val/cat": 3, "train/dog": 5, "val/dog": 2}


def test_same_seed_gives_same_split_and_another_seed_a_different_one(tmp_path, demo_animals):
    usable = {"cat": [f"c{i}.jpg" for i in range(20)], "dog": [f"d{i}.jpg" for i in range(20)]}
    first = splitting.split(usable, 0.7, seed=0)
    assert splitting.split(dict(usable), 0.7, seed=0) == first
    assert splitting.split(usable, 0.7, seed=1) != first
    # the order files are found in does not matter, only the seed
    shuffled = {name: list(reversed(files)) for name, files in usable.items()}
    assert splitting.split(shuffled, 0.7, seed=0) == first

    listings = {}
    for dest, seed in (("a", 3), ("b", 3), ("c", 4)):
        proc = split_here("--source", demo_animals, "--dest", dest,
                          "--seed", seed, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        listings[dest] = split_listing(tmp_path / dest)
    assert listings["a"] == listings["b"]
    assert listings["a"] != listings["c"]


def test_rerun_after_deleting_a_source_image_leaves_no_stale_file(tmp_path, demo_animals):
    assert split_here("--source", demo_animals, cwd=tmp_path).returncode == 0
    assert len(files_under(tmp_path / "dataset")) == 20 + 1  # + the marker
    (demo_animals / "cat" / "cat_0004.jpg").unlink()
    (demo_animals / "dog" / "dog_0007.jpg").unlink()
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    copied = files_under(tmp_path / "dataset")
    assert len(copied) == 18 + 1
    assert not [p for p in copied if p.endswith(("cat_0004.jpg", "dog_0007.jpg"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]


def test_failed_rerun_leaves_previous_split_as_it_was(tmp_path, demo_animals):
    assert split_here("--source", demo_animals, cwd=tmp_path).returncode == 0
    before = tree_digest(tmp_path / "dataset")
    for path in list((demo_animals / "dog").iterdir())[1:]:
        path.unlink()  # dog now has a single picture: nothing left for validation
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert_clean_error(proc, "'dog'")
    assert tree_digest(tmp_path / "dataset") == before


@pytest.fixture
def earlier_split(tmp_path, demo_animals):
    """A split of demo_animals, then one picture fewer in the source: a re-run must change it.

    Returns the digests of dataset/ and of the source before that re-run."""
    assert split_here("--source", demo_animals, cwd=tmp_path).returncode == 0
    (demo_animals / "cat" / "cat_0000.jpg").unlink()
    return tree_digest(tmp_path / "dataset"), tree_digest(demo_animals)


def test_a_copy_failing_midway_leaves_the_previous_split_and_the_source_as_they_were(
        tmp_path, demo_animals, earlier_split, monkeypatch):
    copy2, copied = shutil.copy2, []

    def disk_full_at_the_fifth_file(source, destination, **options):
        copied.append(source)
        if len(copied) == 5:
            raise OSError(28, "No space left on device")
        return copy2(source, destination, **options)

    monkeypatch.setattr(shutil, "copy2", disk_full_at_the_fifth_file)
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert_clean_error(proc, "dataset", "No space left on device", "previous split is as it was")
    assert len(copied) == 5  # it failed mid-way, after four pictures were copied
    assert (tree_digest(tmp_path / "dataset"), tree_digest(demo_animals)) == earlier_split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]  # no temporaries


def test_a_failed_swap_puts_the_previous_split_back(tmp_path, demo_animals, earlier_split,
                                                    monkeypatch):
    rename, renamed = os.rename, []

    def refuse_to_move_the_new_split_in(source, destination):
        renamed.append(os.path.basename(source))
        if ".building-" in os.path.basename(source):
            raise OSError(13, "Permission denied")
        return rename(source, destination)

    monkeypatch.setattr(os, "rename", refuse_to_move_the_new_split_in)
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert_clean_error(proc, "dataset", "Permission denied", "previous split is as it was")
    # the old split was moved aside, the new one refused, the old one moved back
    assert [name.split("-")[0] for name in renamed] == ["dataset", ".dataset.building",
                                                        ".dataset.old"]
    assert (tree_digest(tmp_path / "dataset"), tree_digest(demo_animals)) == earlier_split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]


# --- one-line errors -------------------------------------------------------

def test_the_real_cli_splits_without_importing_torch(tmp_path, demo_animals):
    """Splitting needs no torch: split_dataset.py starts in a fraction of a second, not in
    the seconds torch and torchvision take to import."""
    proc = run_script("split_dataset.py", "--source", demo_animals, cwd=tmp_path,
                      env={"PYTHONPROFILEIMPORTTIME": 1})  # (python -X importtime)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "compress.data.splitting" in imported  # (the list is there)
    assert not {"torch", "torchvision", "nni"} & imported
    assert len(list((tmp_path / "dataset").rglob("*.jpg"))) == 20


def test_missing_source_is_a_one_line_error_from_the_real_cli(tmp_path):
    proc = run_script("split_dataset.py", "--source", "no_such_photos", cwd=tmp_path)
    assert_clean_error(proc, "no_such_photos", "not found")
    assert list(tmp_path.iterdir()) == []


def test_empty_source_is_a_one_line_error(tmp_path):
    (tmp_path / "empty_photos").mkdir()
    proc = split_here("--source", "empty_photos", cwd=tmp_path)
    assert_clean_error(proc, "empty_photos", "two class")
    assert not (tmp_path / "dataset").exists()


def test_source_with_one_class_is_a_one_line_error(tmp_path, demo_animals):
    shutil.rmtree(demo_animals / "dog")
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert_clean_error(proc, demo_animals, "'cat'")
    assert not (tmp_path / "dataset").exists()


def test_class_too_small_to_leave_validation_images_is_a_one_line_error(tmp_path, demo_animals):
    for path in list((demo_animals / "dog").iterdir())[1:]:
        path.unlink()
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    message = assert_clean_error(proc, "'dog'", "1 usable image")
    assert "validation" in message
    assert not (tmp_path / "dataset").exists()


def test_split_refuses_to_replace_a_folder_it_did_not_make_real_cli(tmp_path, demo_animals):
    mine = tmp_path / "my_results"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("\\section{Results}\n")
    (mine / "sub" / "figure.jpg").write_bytes(b"\xff\xd8 precious")
    before = tree_digest(mine)
    proc = run_script("split_dataset.py", "--source", demo_animals, "--dest", "my_results",
                      cwd=tmp_path)
    assert_clean_error(proc, "my_results", "refusing")
    assert tree_digest(mine) == before


def test_split_refuses_dest_inside_source_real_cli(tmp_path, demo_animals):
    before = tree_digest(demo_animals)
    proc = run_script("split_dataset.py", "--source", demo_animals,
                      "--dest", demo_animals / "split", cwd=tmp_path)
    assert_clean_error(proc, demo_animals / "split", "overlaps")
    assert tree_digest(demo_animals) == before


def test_empty_class_folder_is_a_one_line_error_naming_the_class(tmp_path, demo_animals):
    (demo_animals / "bird").mkdir()
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert_clean_error(proc, "'bird'", "0 usable image")
    assert not (tmp_path / "dataset").exists()


def test_thousands_of_bad_files_are_summarised_not_listed(tmp_path, demo_animals):
    for index in range(300):
        (demo_animals / "cat" / f"broken_{index:03d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (demo_animals / "dog" / f"note_{index:03d}.txt").write_text("hello")
    proc = split_here("--source", demo_animals, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("Skipped 600 file(s) that are not usable images (300 cannot be decoded, "
            "300 not an image)") in proc.stdout
    assert "... and 595 more" in proc.stdout
    assert len(proc.stdout.splitlines()) < 15
    assert len(list((tmp_path / "dataset").rglob("*.jpg"))) == 20


def test_rerun_refuses_to_delete_files_added_to_its_own_split(tmp_path, demo_animals):
    assert split_here("--source", demo_animals, cwd=tmp_path).returncode == 0
    holdout = tmp_path / "dataset" / "test" / "cat" / "holdout.jpg"
    holdout.parent.mkdir(parents=True)
    holdout.write_bytes(b"my own test picture")
    before = tree_digest(tmp_path / "dataset")
    for replace in ([], ["--replace"]):  # not even when asked to replace a foreign split
        proc = split_here("--source", demo_animals, *replace, cwd=tmp_path)
        assert_clean_error(proc, "dataset", "test/cat/holdout.jpg", "did not write")
        assert tree_digest(tmp_path / "dataset") == before


# --- a held-out test split -------------------------------------------------------------

def test_test_ratio_holds_out_a_test_split_disjoint_from_train_and_val(tmp_path, demo_animals):
    proc = split_here("--source", demo_animals, "--ratio", "0.6", "--test-ratio", "0.2",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "dataset"
    for name in ("cat", "dog"):
        parts = {part: {p.name for p in (dest / part / name).iterdir()}
                 for part in ("train", "val", "test")}
        assert {part: len(files) for part, files in parts.items()} == \
            {"train": 6, "val": 2, "test": 2}
        assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"]
                    or parts["val"] & parts["test"])
        assert parts["train"] | parts["val"] | parts["test"] == \
            {p.name for p in (demo_animals / name).iterdir()}
    marker = json.loads((dest / splitting.MARKER).read_text())
    assert marker["test_ratio"] == 0.2 and marker["classes"]["cat"] == \
        {"train": 6, "val": 2, "test": 2}
    assert "dataset/test (4)" in proc.stdout


def test_without_a_test_ratio_the_split_is_the_one_it_always_was():
    usable = {"cat": [f"c{i}.jpg" for i in range(20)]}
    train, val, test = splitting.split(usable, 0.7, seed=3)["cat"]
    assert test == [] and len(val) == 6
    # the val part of a 0.7 split without test is what a 0.7 / 0.1 split divides in two
    _, val_then, test_then = splitting.split(usable, 0.7, seed=3, test_ratio=0.1)["cat"]
    assert set(val_then) | set(test_then) == set(val)


def test_a_ratio_and_test_ratio_leaving_no_validation_is_one_line(tmp_path, demo_animals):
    proc = split_here("--source", demo_animals, "--ratio", "0.7", "--test-ratio", "0.3",
                      cwd=tmp_path)
    assert_clean_error(proc, "--ratio 0.7", "--test-ratio 0.3")
    assert not (tmp_path / "dataset").exists()


def test_a_class_too_small_for_a_test_part_is_one_line(tmp_path):
    source = generate_demo(tmp_path / "photos", per_class=3)
    proc = split_here("--source", source, "--ratio", "0.5", "--test-ratio", "0.1", cwd=tmp_path)
    assert_clean_error(proc, "none for test")
