"""Stage 1: split a folder of labelled photos into training and validation sets.

Reads  SOURCE/<class>/<image>   (one sub-folder per class, e.g. animals/cat, animals/dog)
Writes DEST/train/<class>/...    a seeded random RATIO of each class's images
       DEST/val/<class>/...      the rest

Files that are not images (.DS_Store, Thumbs.db, notes) and images that cannot be
decoded (empty, truncated, corrupt) are skipped and listed in a summary. The
source folder is only read, never changed. The new split is built beside DEST and
swapped in when complete, so a re-run leaves no stale files and a failed run
leaves the previous DEST as it was.

    python split_dataset.py                      # animals/ -> dataset/, 70% train
    python split_dataset.py --source photos --ratio 0.8
    python split_dataset.py --replace            # over a dataset/ the original demo made
"""
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from cli import UserError, fraction, make_parser, run_cli
from data import check_image, find_classes, is_image_name

MARKER = ".split_dataset.json"  # marks a folder this script made and may replace


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--source", default="animals", help="folder with one sub-folder per class")
    parser.add_argument("--dest", default="dataset", help="output folder (train/ and val/ inside)")
    parser.add_argument("--ratio", type=fraction, default=0.7,
                        help="fraction of each class that goes to train/")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the split")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads used to check that images decode")
    parser.add_argument("--replace", action="store_true",
                        help="replace a DEST that this script did not make, such as the "
                             "original demo's dataset/, if it holds nothing but train/ and val/ "
                             "(files added to a split this script made are never replaced)")
    return parser


def scan(source, workers):
    """{class: [usable file names]} and the skipped files as (path, reason)."""
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
        problems = list(tqdm(pool.map(check_image, paths), total=len(paths),
                             desc="checking images", leave=False, disable=None))
    usable = {name: [] for name in classes}
    for (name, file), path, problem in zip(candidates, paths, problems):
        if problem:
            skipped.append((path, problem))
        else:
            usable[name].append(file)
    return usable, skipped


def split(usable, train_ratio, seed):
    """{class: (train files, val files)}; the same inputs always give the same split."""
    result = {}
    for name, files in usable.items():
        shuffled = sorted(files)
        random.Random(f"{seed}/{name}").shuffle(shuffled)
        n_val = round(len(shuffled) * (1 - train_ratio))
        if n_val == 0 or n_val == len(shuffled):
            raise UserError(f"class {name!r} has {len(files)} usable image(s): a {train_ratio:g} "
                            "split leaves none for " + ("validation" if n_val == 0 else "training")
                            + "; add more images to that class")
        result[name] = (sorted(shuffled[n_val:]), sorted(shuffled[:n_val]))
    return result


def check_destination(source, dest, replace=False):
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
            name in ("train", "val") and os.path.isdir(os.path.join(dest, name))))
        if others:
            raise UserError(f"{dest}: holds more than a train/ and val/ split (e.g. {others[0]}); "
                            "refusing to replace it, even with --replace")
        return
    present = {os.path.relpath(os.path.join(folder, name), dest)
               for folder, _, names in os.walk(dest) for name in names} - {MARKER}
    added = sorted(present - written)
    if added:
        raise UserError(f"{dest}: holds {len(added)} file(s) that split_dataset.py did not write "
                        f"(e.g. {added[0]}); refusing to replace it (move them elsewhere first, "
                        "or choose another --dest)")


def write_split(source, dest, plan, summary):
    """Build the split in a sibling folder, then swap it in; DEST is intact until the swap.

    A failure on the way (a full disk, a file that vanished) is a one-line error, with
    the previous DEST as it was and the half-built folder removed.
    """
    target = os.path.realpath(dest)  # through a link: replace the folder it points to
    parent = os.path.dirname(target)
    building = os.path.join(parent, f".{os.path.basename(target)}.building-{os.getpid()}")
    retired = os.path.join(parent, f".{os.path.basename(target)}.old-{os.getpid()}")
    total = sum(len(t) + len(v) for t, v in plan.values())
    try:
        with tqdm(total=total, desc="copying", leave=False, disable=None) as bar:
            for name, (train, val) in plan.items():
                for part, files in (("train", train), ("val", val)):
                    folder = os.path.join(building, part, name)
                    os.makedirs(folder)
                    for file in files:
                        shutil.copy2(os.path.join(source, name, file), os.path.join(folder, file))
                        bar.update()
        files = [os.path.join(part, name, file) for name, (train, val) in plan.items()
                 for part, files in (("train", train), ("val", val)) for file in files]
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


def describe_skipped(skipped, shown=5):
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


def main(args):
    check_destination(args.source, args.dest, args.replace)
    usable, skipped = scan(args.source, args.workers)
    if skipped:
        print(describe_skipped(skipped))
    plan = split(usable, args.ratio, args.seed)
    summary = {"source": os.path.abspath(args.source), "ratio": args.ratio, "seed": args.seed,
               "classes": {name: {"train": len(t), "val": len(v)} for name, (t, v) in plan.items()},
               "skipped": [[path, reason] for path, reason in skipped]}
    write_split(args.source, args.dest, plan, summary)
    n_train = sum(len(t) for t, _ in plan.values())
    n_val = sum(len(v) for _, v in plan.values())
    print(f"Split {n_train + n_val} images of {len(plan)} classes into "
          f"{os.path.join(args.dest, 'train')} ({n_train}) and {os.path.join(args.dest, 'val')} "
          f"({n_val}):")
    for name, (train, val) in plan.items():
        print(f"  {name:<20} train {len(train):>6}   val {len(val):>6}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
