"""Stage 1: split a folder of labelled photos into training, validation (and test) sets.

Reads  SOURCE/<class>/<image>   (one sub-folder per class, e.g. animals/cat, animals/dog)
Writes DEST/train/<class>/...    a seeded random RATIO of each class's images
       DEST/val/<class>/...      the rest (less the test part)
       DEST/test/<class>/...     with --test-ratio: that share, held out. Checkpoints are
                                 chosen on val/, so val/ flatters them; test.py --compare,
                                 export.py's check and sweep.py then report on test/

Files that are not images (.DS_Store, Thumbs.db, notes) and images that cannot be
decoded (empty, truncated, corrupt) are skipped and listed in a summary. Copies of one
photo (the same picture resized, re-encoded or recoloured, under another name: found by
a perceptual hash) are kept in one part, so that no photo is validated or tested on a
copy of itself that was trained on; the summary says how many. The
source folder is only read, never changed. The new split is built beside DEST and
swapped in when complete, so a re-run leaves no stale files and a failed run
leaves the previous DEST as it was.

    python split_dataset.py                      # animals/ -> dataset/, 70% train
    python split_dataset.py --source photos --ratio 0.8
    python split_dataset.py --source photos --ratio 0.6 --test-ratio 0.2   # 60:20:20
    python split_dataset.py --replace            # over a dataset/ the original demo made
"""
import os

from compress.cli import UserError, fraction, make_parser, run_cli
from compress.data.splitting import (MARKER, PARTS, check_destination, describe_skipped,
                                     duplicate_groups, scan, split, write_split)
from compress.machine.resources import check_room, check_writable


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--source", default="animals", help="folder with one sub-folder per class")
    parser.add_argument("--dest", default="dataset", help="output folder (train/ and val/ inside)")
    parser.add_argument("--ratio", type=fraction, default=0.7,
                        help="fraction of each class that goes to train/")
    parser.add_argument("--test-ratio", type=fraction, default=0.0,
                        help="fraction of each class held out in test/ (taken from what "
                             "--ratio leaves for val/); 0: no test/")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the split")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads used to check that images decode")
    parser.add_argument("--replace", action="store_true",
                        help="replace a DEST that this script did not make, such as the "
                             "original demo's dataset/, if it holds nothing but train/ and val/ "
                             "(files added to a split this script made are never replaced)")
    return parser


def main(args):
    check_destination(args.source, args.dest, args.replace)
    check_writable(os.path.realpath(args.dest), "--dest")  # (built beside it, then swapped in)
    if args.ratio + args.test_ratio >= 1:
        raise UserError(f"--ratio {args.ratio:g} and --test-ratio {args.test_ratio:g} leave "
                        "nothing for val/: together they must stay below 1")
    usable, skipped, hashes = scan(args.source, args.workers)
    if skipped:
        print(describe_skipped(skipped))
    groups = duplicate_groups(hashes)
    if groups:
        print(f"Found {sum(map(len, groups))} pictures that are copies of another ({len(groups)} "
              f"group(s), e.g. {' = '.join('/'.join(key) for key in groups[0][:2])}); each "
              "group is kept in one part (listed in the destination's "
              f"{os.path.basename(MARKER)})")
    plan = split(usable, args.ratio, args.seed, args.test_ratio, groups)
    parts = PARTS if args.test_ratio else PARTS[:2]
    summary = {"source": os.path.abspath(args.source), "ratio": args.ratio, "seed": args.seed,
               "classes": {name: dict(zip(parts, map(len, files)))
                           for name, files in plan.items()},
               "skipped": [[path, reason] for path, reason in skipped],
               "copies": [["/".join(key) for key in group] for group in groups]}
    if args.test_ratio:
        summary["test_ratio"] = args.test_ratio
    check_room(args.dest, sum(os.path.getsize(os.path.join(args.source, name, file))
                              for name, files in plan.items() for part in files for file in part),
               "the copies of the pictures")
    write_split(args.source, args.dest, plan, summary)
    counts = {part: sum(len(files[i]) for files in plan.values()) for i, part in enumerate(parts)}
    print(f"Split {sum(counts.values())} images of {len(plan)} classes into "
          + " and ".join(f"{os.path.join(args.dest, part)} ({count})"
                         for part, count in counts.items()) + ":")
    for name, files in plan.items():
        print(f"  {name:<20}" + "".join(f" {part} {len(part_files):>6}  "
                                        for part, part_files in zip(parts, files)).rstrip())

if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
