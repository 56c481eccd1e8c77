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
import os

from compress.cli import fraction, make_parser, run_cli
from compress.machine import check_room, check_writable
from compress.splitting import check_destination, describe_skipped, scan, split, write_split


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


def main(args):
    check_destination(args.source, args.dest, args.replace)
    check_writable(os.path.realpath(args.dest), "--dest")  # (built beside it, then swapped in)
    usable, skipped = scan(args.source, args.workers)
    if skipped:
        print(describe_skipped(skipped))
    plan = split(usable, args.ratio, args.seed)
    summary = {"source": os.path.abspath(args.source), "ratio": args.ratio, "seed": args.seed,
               "classes": {name: {"train": len(t), "val": len(v)} for name, (t, v) in plan.items()},
               "skipped": [[path, reason] for path, reason in skipped]}
    check_room(args.dest, sum(os.path.getsize(os.path.join(args.source, name, file))
                              for name, parts in plan.items() for part in parts for file in part),
               "the copies of the pictures")
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
