"""Stage 7: how small, how fast, for how much accuracy -- choose by measurement.

Reads  WEIGHTS (vgg16Net.pth)           the dense checkpoint from train.py
       DATA/train/, DATA/val/           (made by split_dataset.py)
Writes OUTPUT_DIR/ (sweep/)             per setting NAME (l1-0.5, slim-global-0.7, ...):
         NAME.pruned.pth                  pruner.py's output (and .channels.png)
         NAME.pth                         the student distilled by knowledge_distillation.py
                                          (and .history.json/.png)
       OUTPUT_DIR/sweep.json            the dense model's object, then one per setting: method,
                                        sparsity, accuracy, params, FLOPs, file size, latency,
                                        throughput, path
       OUTPUT_DIR/sweep.png             accuracy against latency and against parameters,
                                        the Pareto front marked, the dense model for reference
       OUTPUT_DIR/compare.json/.png     test.py --compare's report of the same run

Each setting is pruned (pruner.py), distilled from the dense teacher for
--kd-epochs (knowledge_distillation.py), then all of them and the dense model are
measured together, exactly as test.py --compare measures: accuracy on DATA/val,
and latency timed interleaved so that the models are compared under the same
conditions. A setting already distilled is not run again: run the same command
after Ctrl-C, or with more settings, and only what is missing runs (timing is
always redone, as timings are only comparable within one run). The report holds
every setting distilled in OUTPUT_DIR from the same teacher with the same
distillation flags, earlier runs' too.

--max-drop D names the fastest model within D points of the dense accuracy;
--search METHOD bisects the sparsity of METHOD for the largest one within that
budget.

    python sweep.py                                   # l1 at 0.5, 0.7, 0.9; 3 KD epochs
    python sweep.py --methods l1 slim:global --sparsities 0.5 0.7 --mobilenet-v2
    python sweep.py --max-drop 1.0 --search l1
"""
import json
import os
import time

import knowledge_distillation
import pruner
import test
from checkpoints import (check_made_for, file_sha256, load_checkpoint, model_from_checkpoint,
                         write_json)
from cli import (CheckFailed, Interrupted, UserError, add_data_args, add_timing_args, fraction,
                 int_within, make_parser, positive_float, positive_int, pyplot, resolve_device,
                 run_cli)
from model import MOBILENET_V2, count_parameters

def points(text):
    """--max-drop: accuracy points, 0 to 100."""
    value = float(text)
    if not 0 <= value <= 100:
        raise ValueError(text)
    return value


points.__name__ = "number of accuracy points (0 to 100)"


def method_setting(text):
    """METHOD or METHOD:global, as --methods and --search take them."""
    method, _, scope = text.partition(":")
    if method not in pruner.METHODS or scope not in ("", "global"):
        raise ValueError(text)
    return method, scope == "global"


method_setting.__name__ = "method (one of " + ", ".join(pruner.METHODS) + ", optionally :global)"


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, batch_size=32, training=True)
    parser.add_argument("--weights", default="vgg16Net.pth", help="dense checkpoint (the teacher)")
    parser.add_argument("--methods", nargs="+", type=method_setting, metavar="METHOD[:global]",
                        help="pruner.py --method of each setting (" + ", ".join(pruner.METHODS)
                             + "); METHOD:global adds --global (default: l1)")
    parser.add_argument("--sparsities", nargs="+", type=fraction, default=[0.5, 0.7, 0.9],
                        metavar="S", help="pruner.py --sparsity values, each tried with every "
                                          "method")
    parser.add_argument("--mobilenet-v2", action="store_true",
                        help="also distil a MobileNetV2 student (knowledge_distillation.py "
                             "--student-arch mobilenet_v2)")
    parser.add_argument("--kd-epochs", type=positive_int, default=3,
                        help="distillation epochs of each setting")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="distillation Adam rate")
    parser.add_argument("--max-drop", type=points, metavar="POINTS",
                        help="name the fastest model within POINTS of the dense accuracy")
    parser.add_argument("--search", type=method_setting, metavar="METHOD[:global]",
                        help="with --max-drop: bisect METHOD's sparsity for the largest within "
                             "the budget (each probe is a setting of its own)")
    parser.add_argument("--search-steps", type=int_within(1, "1 to 10", 10), default=4,
                        help="--search: sparsities tried (at most 10: 1/1024 apart)")
    parser.add_argument("--output-dir", default="sweep", help="folder of the sweep's files")
    add_timing_args(parser, test.PRECISION)
    parser.add_argument("--verbose", action="store_true", help="show NNI's warnings and logs")
    return parser


def setting_name(method, global_ranking, sparsity):
    return f"{method}{'-global' if global_ranking else ''}-{sparsity:g}"


def flags(args, *names):
    """The shared flags as they were given, for the stage scripts."""
    given = []
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is True:
            given.append(f"--{name}")
        elif value is not None and value is not False:
            given += [f"--{name}", str(value)]
    return given


def run_stage(stage, argv):
    stage.main(stage.get_args_parser().parse_args(argv))


class Sweep:
    """The settings' rows (sweep.json), kept on disk after every setting so a sweep resumes."""

    def __init__(self, args):
        self.args = args
        self.report = os.path.join(args.output_dir, "sweep.json")
        self.rows = {}
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise UserError(f"--output-dir {args.output_dir}: exists and is not a folder")
        if os.path.isfile(self.report):
            try:
                with open(self.report) as file:
                    self.rows = {row["name"]: row for row in json.load(file)
                                 if row.get("kind") != "dense"}
                if not all(isinstance(row.get("training"), dict) for row in self.rows.values()):
                    raise ValueError
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{self.report}: not a sweep report; give another "
                                "--output-dir, or move it first") from None
        self.training = {"kd_epochs": args.kd_epochs, "lr": args.lr,
                         "batch_size": args.batch_size, "seed": args.seed,
                         "crop_scale": args.crop_scale, "data": os.path.abspath(args.data),
                         "image_size": args.image_size, "amp": args.amp, "cache": args.cache,
                         # (retrained in place, it is another teacher)
                         "teacher_sha256": file_sha256(args.weights)}

    def student(self, name):
        return os.path.join(self.args.output_dir, f"{name}.pth")

    def done(self, name):
        row = self.rows.get(name)
        return (row is not None and os.path.isfile(self.student(name))
                and row["training"] == self.training)

    def run(self, name, method=None, global_ranking=False, sparsity=None, position=""):
        """Prune and distil one setting (unless done before); returns its row."""
        if self.done(name):
            print(f"{name}: done before ({self.rows[name]['accuracy']:.1%}), not run again")
            return self.rows[name]
        args, started = self.args, time.perf_counter()
        student = self.student(name)
        common = flags(args, "data", "image-size", "batch-size", "device", "workers", "seed")
        print(f"\n=== {name} ({position}) ===", flush=True)
        distil = [*common, "--teacher", args.weights, "--output", student,
                  "--epochs", str(args.kd_epochs), "--lr", str(args.lr),
                  *flags(args, "crop-scale", "cache", "amp")]
        state = os.path.splitext(student)[0] + ".state.pth"
        if os.path.isfile(state):
            distil += ["--resume", state]
        if method is None:
            distil += ["--student-arch", MOBILENET_V2]
        else:
            pruned = os.path.join(args.output_dir, f"{name}.pruned.pth")
            if "--resume" not in distil:  # (a resumed distillation keeps its student)
                run_stage(pruner, ["--weights", args.weights, "--output", pruned,
                                   "--method", method, "--sparsity", str(sparsity),
                                   *(["--global"] if global_ranking else []),
                                   *flags(args, "data", "image-size", "batch-size", "seed",
                                          "verbose")])
            distil += ["--student", pruned]
        try:
            run_stage(knowledge_distillation, distil)
        except Interrupted:
            raise Interrupted(f"Stopped while distilling {name}; its state is saved: run the "
                              "same sweep.py command again to continue (finished settings are "
                              "not run again)") from None
        checkpoint = load_checkpoint(student, kinds=("finetuned",))
        self.rows[name] = {"name": name, "method": method or MOBILENET_V2,
                           "global": global_ranking, "sparsity": sparsity, "path": student,
                           "accuracy": checkpoint["metrics"]["val_accuracy"],
                           "params": count_parameters(model_from_checkpoint(checkpoint, student)),
                           "training": self.training,
                           "minutes": round((time.perf_counter() - started) / 60, 2)}
        self.save()
        self.print_progress()
        return self.rows[name]

    def print_progress(self):
        """The settings distilled so far, as a running table."""
        print(f"\n{'setting':<22}{'val acc':>9}{'params':>10}{'minutes':>9}")
        for row in self.rows.values():
            print(f"{row['name']:<22}{row['accuracy']:>9.1%}{row['params'] / 1e6:>9.2f}M"
                  f"{row['minutes']:>9.1f}")
        print(flush=True)

    def save(self, dense=None):
        rows = ([dense] if dense else []) + list(self.rows.values())
        write_json(rows, self.report)


def search(sweep, method, global_ranking, dense_accuracy, max_drop, steps):
    """The largest sparsity of `method` whose student stays within `max_drop` points of
    the dense accuracy, by bisection between 0 (the dense model) and 1."""
    low, high = 0.0, 1.0
    for step in range(steps):
        sparsity = round((low + high) / 2, 4)
        row = sweep.run(setting_name(method, global_ranking, sparsity), method, global_ranking,
                        sparsity, f"search step {step + 1} of {steps}")
        within = within_budget(row["accuracy"], dense_accuracy, max_drop)
        print(f"search: sparsity {sparsity:g} is {'within' if within else 'outside'} the "
              f"{max_drop:g}-point budget ({row['accuracy']:.1%} vs dense {dense_accuracy:.1%})")
        low, high = (sparsity, high) if within else (low, sparsity)
    return low


def within_budget(accuracy, dense_accuracy, max_drop):
    """Whether `accuracy` is at most `max_drop` points below the dense model's (a student
    exactly at the budget is within it, whatever the floating-point rounding)."""
    return round(100 * (dense_accuracy - accuracy), 9) <= max_drop


def pareto(rows, key):
    """Names of the rows no other row beats in both `key` (lower) and accuracy (higher)."""
    front, best = set(), -1.0
    for row in sorted(rows, key=lambda r: (r[key], -r["accuracy"])):
        if row["accuracy"] > best:
            front.add(row["name"])
            best = row["accuracy"]
    return front


def pick(rows, dense, max_drop):
    """The fastest row (batch-1 latency; fewer parameters on a tie) within `max_drop` points."""
    within = [r for r in rows if within_budget(r["accuracy"], dense["accuracy"], max_drop)]
    return min(within, key=lambda r: (r["latency_ms"], r["params"]), default=None)


def print_table(rows, dense):
    header = (f"{'setting':<22}{'val acc':>9}{'params':>10}{'x fewer':>9}{'FLOPs':>9}"
              f"{'latency b=1':>14}{'IQR':>7}{'x faster':>10}{'img/s b=32':>12}")
    print(f"\n{header}\n{'-' * len(header)}")
    for row in [dense, *rows]:
        mark = "*" if row.get("picked") else "p" if row.get("pareto_latency") else ""
        print(f"{row['name'][:19] + ' ' + mark:<22}{row['accuracy']:>9.1%}"
              f"{row['params'] / 1e6:>9.2f}M{dense['params'] / row['params']:>8.1f}x"
              f"{row['flops'] / 1e9:>8.3f}G{row['latency_ms']:>12.2f}ms"
              f"{row['latency_iqr_ms']:>7.2f}{dense['latency_ms'] / row['latency_ms']:>9.1f}x"
              f"{row['throughput_ips']:>12.0f}")
    print("(p: on the accuracy/latency Pareto front; *: picked by --max-drop)")


def plot(rows, dense, path, max_drop):
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, key, label, scale in [(axes[0], "latency_ms", "latency, batch 1 (ms)", 1),
                                    (axes[1], "params", "parameters (M)", 1e6)]:
        front = sorted((r for r in rows if r[f"pareto_{key.split('_')[0]}"]), key=lambda r: r[key])
        axis.plot([r[key] / scale for r in front], [100 * r["accuracy"] for r in front], "-",
                  color="C1", label="Pareto front")
        axis.scatter([r[key] / scale for r in rows], [100 * r["accuracy"] for r in rows],
                     color=["C1" if r in front else "C0" for r in rows], zorder=3)
        axis.scatter([dense[key] / scale], [100 * dense["accuracy"]], marker="*", s=200,
                     color="C3", zorder=3, label="dense")
        if max_drop is not None:
            axis.axhline(100 * dense["accuracy"] - max_drop, color="C3", linestyle=":",
                         label=f"--max-drop {max_drop:g}")
        for row in rows:
            axis.annotate(row["name"] + (" (picked)" if row.get("picked") else ""),
                          (row[key] / scale, 100 * row["accuracy"]), fontsize=8,
                          textcoords="offset points", xytext=(4, 4))
        axis.set_xscale("log")
        axis.set(xlabel=label + " (log)", ylabel="val accuracy (%)")
        axis.legend()
    figure.suptitle(f"Sweep measured on {dense['device']}, {dense['threads']} threads, "
                    f"{dense['image_size']} px")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def measure(sweep, args):
    """(rows, dense row): the settings done with these training settings and the dense
    model, measured together by test.py --compare, the Pareto fronts marked."""
    left_out = [name for name in sweep.rows if not sweep.done(name)]
    if left_out:
        print(f"Left out (distilled with other settings, or their file is gone): "
              f"{', '.join(left_out)}; their rows leave sweep.json, their files stay")
    done = [dict(row, path=sweep.student(name)) for name, row in sweep.rows.items()
            if name not in left_out]
    print(f"\nMeasuring the dense model and {len(done)} settings as test.py --compare ...",
          flush=True)
    measured = test.compare(test.get_args_parser().parse_args(
        ["--compare", args.weights, *(row["path"] for row in done),
         "--report", os.path.join(args.output_dir, "compare.json"),
         *flags(args, "warmup", "repeats", "max-repeats", "data", "image-size", "batch-size",
                "device", "workers", "seed", "verbose")]),
        resolve_device(args.device))
    rows = []
    for row, numbers in zip(done, measured[1:]):  # test.py keeps the order it was given
        if numbers["path"] != row["path"]:
            raise CheckFailed(f"sweep.py: measured {numbers['path']} for {row['name']}")
        # the setting as it was made, the numbers as measured now
        rows.append({**row, **numbers, "name": row["name"]})
    for key in ("latency_ms", "params"):
        front = pareto(rows, key)
        for row in rows:
            row[f"pareto_{key.split('_')[0]}"] = row["name"] in front
    return rows, dict(measured[0], name="dense")


def main(args):
    if args.search and args.max_drop is None:
        raise UserError("--search: needs --max-drop (the budget the sparsity must stay within)")
    dense_checkpoint = load_checkpoint(args.weights, kinds=("dense",))
    # what the stages would refuse only when their turn comes, refused before any work
    check_made_for(dense_checkpoint, args.weights, "--image-size", image_size=args.image_size)
    dense_accuracy = dense_checkpoint["metrics"].get("val_accuracy")
    if args.search and dense_accuracy is None:
        raise UserError(f"{args.weights}: records no validation accuracy to --search against")
    methods = args.methods or [("l1", False)]
    if any(method == "slim" for method, _ in methods) and \
            not dense_checkpoint["architecture"]["batch_norm"]:
        raise UserError(f"{args.weights}: has no batch norm, and --methods slim ranks channels "
                        "by their batch-norm scales")
    sweep = Sweep(args)
    os.makedirs(args.output_dir, exist_ok=True)
    settings = [(setting_name(m, g, s), m, g, s) for m, g in methods for s in args.sparsities]
    if args.mobilenet_v2:
        settings.append((MOBILENET_V2, None, False, None))
    print(f"Sweep of {len(settings)} settings{' and a search' if args.search else ''} "
          f"from {args.weights}, {args.kd_epochs} distillation epochs each, into "
          f"{args.output_dir}/", flush=True)
    for number, (name, method, global_ranking, sparsity) in enumerate(settings, 1):
        sweep.run(name, method, global_ranking, sparsity, f"setting {number} of {len(settings)}")
    if args.search:
        found = search(sweep, *args.search, dense_accuracy, args.max_drop, args.search_steps)
        print(f"search: the largest {args.search[0]} sparsity within {args.max_drop:g} points "
              f"is {found:g}" if found else "search: no sparsity tried stays within the budget")

    rows, dense = measure(sweep, args)
    chosen = pick(rows, dense, args.max_drop) if args.max_drop is not None else None
    for row in rows:
        row["picked"] = row is chosen
    sweep.rows = {row["name"]: row for row in rows}
    sweep.save(dense)
    print_table(rows, dense)
    figure = os.path.join(args.output_dir, "sweep.png")
    plot(rows, dense, figure, args.max_drop)
    if args.max_drop is not None:
        print(f"--max-drop {args.max_drop:g}: " + (
            f"{chosen['name']} ({chosen['path']}): {chosen['accuracy']:.1%} vs dense "
            f"{dense['accuracy']:.1%}, {dense['params'] / chosen['params']:.1f}x fewer "
            f"parameters, {dense['latency_ms'] / chosen['latency_ms']:.1f}x faster at batch 1"
            if chosen else f"no setting is within {args.max_drop:g} points of the dense "
                           f"{dense['accuracy']:.1%}"))
    print(f"Saved {sweep.report} and {figure}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
