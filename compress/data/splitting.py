"""Splitting a folder of labelled photos into training, validation and test sets, safely.

- `check_destination()`: refuse a DEST that overlaps SOURCE or holds what this
  module did not write (a marker file lists what it wrote).
- `scan()`: the usable pictures of each class (every one decoded once; files that
  are not pictures, or do not decode, set aside with the reason) and their perceptual
  hashes.
- `duplicate_groups()`: the pictures that are copies of each other (the same photo
  resized, re-encoded or recoloured, under another name or in another class).
- `split()`: a seeded split of each class into train/val (and test, if asked); the same
  inputs always give the same split; each group of copies lands in one part.
- `write_split()`: the split built beside DEST and swapped in whole; a failure (a
  full disk) leaves the previous DEST as it was.

The source folder is only read, never changed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from compress.cli import UserError
import numpy as np

from compress.data.pictures import find_classes, inspect_image, is_image_name

MARKER = ".split_dataset.json"  # marks a folder this script made and may replace


def scan(source: str, workers: int) -> tuple[dict, list, dict]:
    """{class: [usable file names]}, the skipped files as (path, reason), and
    {(class, file name): perceptual hash} of the usable ones."""
    if not os.path.isdir(source):
        raise UserError(f"{source}: folder not found (expected {source}/<class>/<images>, "
                        "one sub-folder per class)")
    classes = find_classes(source)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise UserError(f"{source}: needs at least two class sub-folders "
                        f"(e.g. {source}/cat and {source}/dog), found {found}")
    candidates, skipped = [], []
    for name in classes:
        for entry in sorted(os.scandir(os.path.join(source, name)), key=lambda e: e.name):
            if not entry.is_file():
                continue
            if is_image_name(entry.name):
                candidates.append((name, entry.name))
            else:
                skipped.append((entry.path, "not an image"))
    paths = [os.path.join(source, c, f) for c, f in candidates]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without holding the GIL
        verdicts = list(tqdm(pool.map(inspect_image, paths), total=len(paths),
                             desc="checking images", leave=False, disable=None))
    usable, hashes = {name: [] for name in classes}, {}
    for (name, file), path, (problem, picture_hash) in zip(candidates, paths, verdicts):
        if problem:
            skipped.append((path, problem))
        else:
            usable[name].append(file)
            hashes[name, file] = picture_hash
    return usable, skipped, hashes


# Pictures whose hashes differ in at most this many of their 512 bits are copies. On the
# flowers photos (docs/data.md) copies resized or re-encoded were 2-20 bits apart, edited
# ones (recoloured, cropped a little) 34-46, the closest unrelated pair 68.
DUPLICATE_BITS = 48


def duplicate_groups(hashes: dict, max_bits: int = DUPLICATE_BITS) -> list[list]:
    """Groups (sorted lists of `hashes`' keys) of pictures within `max_bits` of each other,
    directly or through a chain of copies; pictures with no copy are in no group."""
    keys = sorted(hashes)
    if not keys:
        return []
    words = np.frombuffer(b"".join(hashes[key] for key in keys), dtype=np.uint64)
    words = words.reshape(len(keys), -1)
    parent = list(range(len(keys)))

    def root(index):
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index
    for start in range(0, len(keys), 512):  # 512 rows at a time: memory stays small
        block = words[start:start + 512]
        bits = sum(np.bitwise_count(block[:, None, word] ^ words[None, :, word]).astype(np.int32)
                   for word in range(words.shape[1]))
        for row, column in zip(*np.nonzero(bits <= max_bits)):
            if column > start + row:
                parent[root(start + row)] = root(int(column))
    groups = {}
    for index, key in enumerate(keys):
        groups.setdefault(root(index), []).append(key)
    return [group for group in groups.values() if len(group) > 1]


PARTS = ("train", "val", "test")  # the folders a split may hold, in this order


def split(usable: dict, train_ratio: float, seed: int, test_ratio: float = 0.0,
          groups: list = ()) -> dict:
    """{class: (train files, val files, test files)}; the same inputs always give the same
    split. `test_ratio` of each class is held out for test/ (none by default), the rest
    beyond `train_ratio` goes to val/; with no test part, the split is the one this
    function has always made. Each of `groups` (lists of (class, file) that are copies of
    each other) then joins the part of its first member, so that no picture is tested on
    a copy of itself that was trained on."""
    result = {}
    for name, files in usable.items():
        shuffled = sorted(files)
        random.Random(f"{seed}/{name}").shuffle(shuffled)
        n_test = round(len(shuffled) * test_ratio)
        n_val = round(len(shuffled) * (1 - train_ratio)) - n_test
        empty = ("validation" if n_val <= 0 else "test" if test_ratio and n_test == 0
                 else "training" if n_val + n_test >= len(shuffled) else None)
        if empty:
            raise UserError(f"class {name!r} has {len(files)} usable image(s): a {train_ratio:g}"
                            + (f"/{test_ratio:g}" if test_ratio else "") + " split leaves none "
                            f"for {empty}; add more images to that class")
        # (val first, as before: without a test part the split is unchanged)
        val, test = shuffled[:n_val], shuffled[n_val:n_val + n_test]
        result[name] = (shuffled[n_val + n_test:], val, test)
    part_of = {(name, file): part for name, parts in result.items()
               for part, files in enumerate(parts) for file in files}
    for first, *copies in groups:
        for name, file in copies:
            result[name][part_of[name, file]].remove(file)
            result[name][part_of[first]].append(file)
    for name, (train, val, test) in result.items():
        if not (train and val and (test or not test_ratio)):
            raise UserError(f"class {name!r}: its pictures are so often copies of each other "
                            "that keeping each photo's copies in one part leaves a part empty; "
                            "add more pictures to that class")
    return {name: tuple(sorted(files) for files in parts) for name, parts in result.items()}


def check_destination(source: str, dest: str, replace: bool = False) -> None:
    """Refuse a DEST that overlaps SOURCE, or holds anything this script did not write.

    With `replace`, a DEST that this script did not make (no marker: the original
    demo's split, say) is replaced if it holds nothing but train/ and val/. Files
    added to a split this script made are never replaced.
    """
    source_abs, dest_abs = os.path.realpath(source), os.path.realpath(dest)
    if dest_abs == source_abs or dest_abs.startswith(source_abs + os.sep) \
            or source_abs.startswith(dest_abs + os.sep):
        raise UserError(f"--dest {dest} overlaps --source {source}; choose a separate folder")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UserError(f"{dest}: exists and is not a folder")
    if not os.path.isdir(dest) or not os.listdir(dest):
        return
    try:
        with open(os.path.join(dest, MARKER)) as marker:
            written = set(json.load(marker)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = None
    if written is None:  # not made by this script
        if not replace:
            raise UserError(f"{dest}: exists and was not made by split_dataset.py (the original "
                            "demo's split, say); refusing to replace it: choose another --dest, "
                            "or add --replace")
        others = sorted(name for name in os.listdir(dest) if not (
            name in PARTS and os.path.isdir(os.path.join(dest, name))))
        if others:
            raise UserError(f"{dest}: holds more than a train/, val/ (and test/) split (e.g. "
                            f"{others[0]}); refusing to replace it, even with --replace")
        return
    present = {os.path.relpath(os.path.join(folder, name), dest)
               for folder, _, names in os.walk(dest) for name in names} - {MARKER}
    added = sorted(present - written)
    if added:
        raise UserError(f"{dest}: holds {len(added)} file(s) that split_dataset.py did not write "
                        f"(e.g. {added[0]}); refusing to replace it (move them elsewhere first, "
                        "or choose another --dest)")


def write_split(source: str, dest: str, plan: dict, summary: dict) -> None:
    """Build the split in a sibling folder, then swap it in; DEST is intact until the swap.

    A failure on the way (a full disk, a file that vanished) is a one-line error, with
    the previous DEST as it was and the half-built folder removed.
    """
    target = os.path.realpath(dest)  # through a link: replace the folder it points to
    parent = os.path.dirname(target)
    building = os.path.join(parent, f".{os.path.basename(target)}.building-{os.getpid()}")
    retired = os.path.join(parent, f".{os.path.basename(target)}.old-{os.getpid()}")
    total = sum(len(files) for parts in plan.values() for files in parts)
    try:
        with tqdm(total=total, desc="copying", leave=False, disable=None) as bar:
            for name, parts in plan.items():
                for part, files in zip(PARTS, parts):
                    if not files:  # (no test part asked for)
                        continue
                    folder = os.path.join(building, part, name)
                    os.makedirs(folder)
                    for file in files:
                        shutil.copy2(os.path.join(source, name, file), os.path.join(folder, file))
                        bar.update()
        files = [os.path.join(part, name, file) for name, parts in plan.items()
                 for part, files in zip(PARTS, parts) for file in files]
        with open(os.path.join(building, MARKER), "w") as marker:
            json.dump(dict(summary, files=files), marker, indent=1)
        if os.path.exists(target):
            os.rename(target, retired)
        try:
            os.rename(building, target)
        except OSError:
            if os.path.exists(retired):
                os.rename(retired, target)  # put the previous split back
            raise
    except OSError as error:
        kept = ("the previous split is as it was" if os.path.exists(target) else
                f"the previous split is in {retired}" if os.path.exists(retired) else
                "nothing was written")
        raise UserError(f"{dest}: could not write the split ({error}); {kept}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def describe_skipped(skipped: list, shown: int = 5) -> str:
    """How many files were skipped for each reason, and the first few of them."""
    reasons = {}
    for _, reason in skipped:
        key = reason.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    lines = [f"Skipped {len(skipped)} file(s) that are not usable images ("
             + ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) + "):"]
    lines += [f"  {path}: {reason}" for path, reason in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"  ... and {len(skipped) - shown} more (all listed in {MARKER} in the "
                     "destination)")
    return "\n".join(lines)
