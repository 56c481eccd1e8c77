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
budget. --engine nni runs the search as an NNI experiment instead (a TPE tuner
proposes settings, a Medianstop assessor stops trials that fall behind, trials
run --concurrency at a time, on this machine or on NNI's other training services
through --nni-config); its results land in the same sweep.json and sweep.png.

    python sweep.py                                   # l1 at 0.5, 0.7, 0.9; 3 KD epochs
    python sweep.py --methods l1 slim:global --sparsities 0.5 0.7 --mobilenet-v2
    python sweep.py --max-drop 1.0 --search l1
    python sweep.py --engine nni --max-drop 1.0 --methods l1 taylor --sparsities 0.5 0.9
"""
import argparse
import dataclasses
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import textwrap
import time

import torch
from tqdm import tqdm

import experiment
import knowledge_distillation
import pruner
import test
from checkpoints import (atomic_write, check_made_for, file_sha256,
                         load_checkpoint, model_from_checkpoint, output_path, write_json)
from cli import (CheckFailed, Interrupted, UserError, add_data_args, add_timing_args, fraction,
                 int_within, make_parser, positive_float, positive_int, pyplot, quiet_nni,
                 resolve_device, run_cli)
from model import MOBILENET_V2, count_parameters

SPARSITY_STEP = 0.025  # --engine nni: the sparsities the tuner may propose


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
    engine = parser.add_argument_group("--engine nni", textwrap.fill(
        "An NNI experiment searches --methods x the sparsity range of "
        "--sparsities (from the smallest to the largest, in steps of "
        f"{SPARSITY_STEP:g}) for the fastest student within --max-drop (needed): NNI's "
        f"{experiment.TUNER} tuner proposes settings, its {experiment.ASSESSOR} assessor "
        "stops a trial whose best validation accuracy falls below the median of the finished "
        "trials' (from half its epochs on, not after its last). The objective each trial "
        "reports (maximised): how many times faster than the dense model at batch 1 it is "
        "(the two timed together in the trial) if within the budget, else minus the points "
        "it is over the budget. Trials write OUTPUT_DIR/trials/TRIAL_ID/; NNI keeps its "
        "files in OUTPUT_DIR/nni/. The finished students are then measured together as in "
        "the plain sweep (sweep.json, sweep.png), the picked one copied to "
        "OUTPUT_DIR/NAME.pth. Run the same command again to resume a stopped experiment.",
        width=76))
    engine.add_argument("--engine", choices=["plain", "nni"], default="plain",
                        help="plain: every setting in turn, in this process; nni: an NNI "
                             "experiment")
    engine.add_argument("--trials", type=positive_int, default=8,
                        help="trials of the experiment (its maxTrialNumber)")
    engine.add_argument("--concurrency", type=positive_int, default=2,
                        help="trials run at once (each with cores / concurrency threads)")
    engine.add_argument("--port", type=int_within(1, "a port number (1 to 65535)", 65535),
                        default=8080, help="of NNI's manager and its web portal")
    engine.add_argument("--host", choices=["127.0.0.1", "0.0.0.0"], default="127.0.0.1",
                        help="address the manager and portal listen on: this machine only, or "
                             "every address (0.0.0.0: anyone who reaches this machine can "
                             "follow and stop the experiment; remote trials need it)")
    engine.add_argument("--nni-config", metavar="YAML",
                        help="NNI's own experiment config (e.g. trainingService: remote, with "
                             "its machines): its settings win; sweep.py sets the trial "
                             "command and folder, the search space and the working directory")
    engine.add_argument("--nni-trial", action="store_true", help=argparse.SUPPRESS)
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


def run_stage(stage, argv, **options):
    return stage.main(stage.get_args_parser().parse_args(argv), **options)


def prune_and_distil(args, student, method, global_ranking, sparsity, on_epoch=None):
    """One setting through pruner.py and knowledge_distillation.py's own command lines:
    the student is written to `student` (NAME.pth; the pruned model beside it as
    NAME.pruned.pth), a MobileNetV2 if `method` is None. A distillation stopped by Ctrl-C
    continues from its state file. `on_epoch(record)` is told each distillation epoch.
    Returns the distillation's history (every epoch, those before a resume too)."""
    common = flags(args, "data", "image-size", "batch-size", "device", "workers", "seed")
    distil = [*common, "--teacher", args.weights, "--output", student,
              "--epochs", str(args.kd_epochs), "--lr", str(args.lr),
              *flags(args, "crop-scale", "cache", "amp")]
    state = output_path(student, "state.pth")
    if os.path.isfile(state):
        distil += ["--resume", state]
    if method is None:
        distil += ["--student-arch", MOBILENET_V2]
    else:
        pruned = output_path(student, "pruned.pth")
        if "--resume" not in distil:  # (a resumed distillation keeps its student)
            run_stage(pruner, ["--weights", args.weights, "--output", pruned,
                               "--method", method, "--sparsity", str(sparsity),
                               *(["--global"] if global_ranking else []),
                               *flags(args, "data", "image-size", "batch-size", "seed",
                                      "verbose")])
        distil += ["--student", pruned]
    return run_stage(knowledge_distillation, distil, on_epoch=on_epoch)


def training_settings(args):
    """What makes two students comparable: the same teacher, data and distillation."""
    return {"kd_epochs": args.kd_epochs, "lr": args.lr, "batch_size": args.batch_size,
            "seed": args.seed, "crop_scale": args.crop_scale, "data": os.path.abspath(args.data),
            "image_size": args.image_size, "amp": args.amp, "cache": args.cache,
            # (retrained in place, it is another teacher)
            "teacher_sha256": file_sha256(args.weights)}


def read_report(path, engine):
    """The settings' rows of a sweep.json made by `engine` (plain or nni)."""
    try:
        with open(path) as file:
            rows = [row for row in json.load(file) if row.get("kind") != "dense"]
        if not all(isinstance(row.get("training"), dict) and isinstance(row["name"], str)
                   for row in rows):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a sweep report; give another --output-dir, or move it "
                        "first") from None
    other = {row.get("engine", "plain") for row in rows} - {engine}
    if other:
        raise UserError(f"{path}: made by sweep.py --engine {other.pop()}; give another "
                        "--output-dir")
    return rows


class Sweep:
    """The settings' rows (sweep.json), kept on disk after every setting so a sweep resumes."""

    def __init__(self, args):
        self.args = args
        self.report = os.path.join(args.output_dir, "sweep.json")
        self.rows = {}
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise UserError(f"--output-dir {args.output_dir}: exists and is not a folder")
        if os.path.isfile(self.report):
            self.rows = {row["name"]: row for row in read_report(self.report, "plain")}
        self.training = training_settings(args)

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
        started = time.perf_counter()
        student = self.student(name)
        print(f"\n=== {name} ({position}) ===", flush=True)
        try:
            prune_and_distil(self.args, student, method, global_ranking, sparsity)
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
    header = (f"{'setting':<30}{'val acc':>9}{'params':>10}{'x fewer':>9}{'FLOPs':>9}"
              f"{'latency b=1':>14}{'IQR':>7}{'x faster':>10}{'img/s b=32':>12}")
    print(f"\n{header}\n{'-' * len(header)}")
    for row in [dense, *rows]:
        mark = "*" if row.get("picked") else "p" if row.get("pareto_latency") else ""
        print(f"{row['name'][:27] + ' ' + mark:<30}{row['accuracy']:>9.1%}"
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


def measure(done, args, report):
    """(rows, dense row): the students of `done` (rows with a "path") and the dense model,
    measured together by test.py --compare (its report: `report`), the Pareto fronts
    marked."""
    print(f"\nMeasuring the dense model and {len(done)} students as test.py --compare ...",
          flush=True)
    measured = test.compare(test.get_args_parser().parse_args(
        ["--compare", args.weights, *(row["path"] for row in done), "--report", report,
         *flags(args, "warmup", "repeats", "max-repeats", "data", "image-size", "batch-size",
                "device", "workers", "seed", "verbose")]),
        resolve_device(args.device))
    rows = []
    for row, numbers in zip(done, measured[1:]):  # test.py keeps the order it was given
        # the setting as it was made, the numbers as measured now
        rows.append({**row, **numbers, "name": row["name"]})
    for key in ("latency_ms", "params"):
        front = pareto(rows, key)
        for row in rows:
            row[f"pareto_{key.split('_')[0]}"] = row["name"] in front
    return rows, dict(measured[0], name="dense")


def present(rows, dense, args):
    """Mark, print and draw the measured rows; returns the row --max-drop picks (or None)."""
    chosen = pick(rows, dense, args.max_drop) if args.max_drop is not None else None
    for row in rows:
        row["picked"] = row is chosen
    print_table(rows, dense)
    plot(rows, dense, os.path.join(args.output_dir, "sweep.png"), args.max_drop)
    if args.max_drop is not None:
        print(f"--max-drop {args.max_drop:g}: " + (
            f"{chosen['name']} ({chosen['path']}): {chosen['accuracy']:.1%} vs dense "
            f"{dense['accuracy']:.1%}, {dense['params'] / chosen['params']:.1f}x fewer "
            f"parameters, {dense['latency_ms'] / chosen['latency_ms']:.1f}x faster at batch 1"
            if chosen else f"no setting is within {args.max_drop:g} points of the dense "
                           f"{dense['accuracy']:.1%}"))
    return chosen


def search_space(methods, sparsities):
    """NNI's search space: --methods x the range of --sparsities (UserError if one point)."""
    low, high = min(sparsities), max(sparsities)
    names = [method + (":global" if global_ranking else "") for method, global_ranking in methods]
    if len(set(names)) == 1 and high - low < SPARSITY_STEP:
        raise UserError(f"--engine nni: the search space holds one setting ({names[0]} at "
                        f"{low:g}); give --sparsities a range (e.g. 0.5 0.9) or more --methods")
    return {"method": {"_type": "choice", "_value": sorted(set(names), key=names.index)},
            "sparsity": {"_type": "quniform", "_value": [low, high, SPARSITY_STEP]}}


def objective(accuracy, dense_accuracy, speedup, max_drop):
    """What an NNI trial reports to the tuner (maximised): `speedup` within the budget; minus
    the points over it outside, so every student within the budget beats every one outside,
    and a near miss beats a far one."""
    if within_budget(accuracy, dense_accuracy, max_drop):
        return speedup
    return -round(100 * (dense_accuracy - accuracy) - max_drop, 9)


def run_trial(args):
    """One trial of the NNI experiment (NNI runs it): the setting its tuner proposes, pruned
    and distilled in OUTPUT_DIR/trials/TRIAL_ID/, each epoch's validation accuracy but the
    last reported to the assessor, then timed beside the dense model and its final result
    (every epoch's accuracy in it) reported."""
    if "NNI_TRIAL_JOB_ID" not in os.environ:  # (set by NNI for each trial it runs)
        raise UserError("--nni-trial: run by NNI's experiment (sweep.py --engine nni), not "
                        "by hand")
    import nni

    parameters = nni.get_next_parameter()
    trial = nni.get_trial_id()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.concurrency))
    method, global_ranking = method_setting(parameters["method"])
    sparsity = round(float(parameters["sparsity"]), 4)
    folder = os.path.join(args.output_dir, "trials", trial)
    os.makedirs(folder, exist_ok=True)
    name = setting_name(method, global_ranking, sparsity)
    student = os.path.join(folder, f"{name}.pth")

    def report_epoch(record):
        # not the last: the assessor would judge a trial that has distilled every epoch,
        # and stopping it then saves nothing and loses its result
        if record["epoch"] < args.kd_epochs:
            nni.report_intermediate_result(record["val_accuracy"])

    try:
        history = prune_and_distil(args, student, method, global_ranking, sparsity,
                                   on_epoch=report_epoch)
        (row,), dense = measure([{"name": name, "path": student}], args,
                                os.path.join(folder, "compare.json"))
    except (Interrupted, KeyboardInterrupt):
        # NNI's assessor stops a trial with SIGINT (a distillation saves its state first);
        # ending by that signal tells NNI the trial was stopped, not that it failed
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    speedup = dense["latency_ms"] / row["latency_ms"]
    nni.report_final_result({
        "default": objective(row["accuracy"], dense["accuracy"], speedup, args.max_drop),
        "trial": trial, "parameters": parameters, "name": name, "method": method,
        "global": global_ranking, "sparsity": sparsity, "path": student,
        "accuracy": row["accuracy"], "dense_accuracy": dense["accuracy"],
        "within_budget": within_budget(row["accuracy"], dense["accuracy"], args.max_drop),
        "speedup": speedup, "latency_ms": row["latency_ms"],
        "dense_latency_ms": dense["latency_ms"], "params": row["params"],
        "flops": row["flops"], "file_bytes": row["file_bytes"],
        "epochs": [record["val_accuracy"] for record in history]})


def trial_command(args, concurrency):
    """The command NNI runs for each trial: this script with the flags a trial needs, its
    files by absolute path (NNI runs trials in this script's folder)."""
    absolute = argparse.Namespace(**vars(args))
    for name in ("data", "weights", "output_dir"):
        setattr(absolute, name, os.path.abspath(getattr(args, name)))
    return shlex.join([sys.executable, os.path.abspath(__file__), *flags(
        absolute, "data", "weights", "output-dir", "image-size", "batch-size", "device",
        "workers", "seed", "crop-scale", "cache", "amp", "kd-epochs", "lr", "max-drop",
        "warmup", "repeats", "max-repeats", "verbose"),
        "--concurrency", str(concurrency), "--nni-trial"])


def describe_trial(trial, epochs):
    """One line on a trial's news (a trial's setting: from the parameters NNI gave it)."""
    if trial.parameters:
        method, global_ranking = method_setting(trial.parameters["method"])
        setting = setting_name(method, global_ranking, round(trial.parameters["sparsity"], 4))
    else:
        setting = "(setting known at its first epoch)"
    line = f"trial {trial.id} {setting}: "
    if trial.succeeded:
        final = trial.final
        return line + (f"finished: {final['accuracy']:.1%} (dense {final['dense_accuracy']:.1%}), "
                       f"{final['speedup']:.1f}x faster, objective {final['default']:.3g}")
    if trial.status == "EARLY_STOPPED":
        return line + (f"stopped by the assessor after {len(trial.epochs)} of {epochs} epochs "
                       f"(best {max(trial.epochs, default=0):.1%})")
    if trial.failed:
        ended = "failed" if trial.status == "FAILED" else "ended without a result"
        return line + f"{ended}; its log ends:\n    " + "\n    ".join(trial.last_lines())
    if trial.status == "USER_CANCELED":
        return line + "canceled (the experiment stopped, or from the portal)"
    if trial.status in experiment.FINISHED:
        return line + trial.status.lower().replace("_", " ")
    if trial.epochs:
        return line + f"epoch {len(trial.epochs)}/{epochs} val {trial.epochs[-1]:.1%}"
    return line + trial.status.lower()


def reported_rows(trials, training):
    """sweep.json's rows of the trials that finished: the setting and numbers each trial
    reported, checked against the parameters NNI gave it."""
    rows = []
    for trial in trials:
        if not trial.succeeded:
            continue
        final = trial.final
        if final["trial"] != trial.id or final["parameters"] != trial.parameters:
            raise CheckFailed(f"trial {trial.id}: its result (trial {final['trial']}, "
                              f"{final['parameters']}) is not of the parameters the tuner "
                              f"gave it ({trial.parameters})")
        rows.append({"name": f"{final['name']} [{trial.id}]", "engine": "nni",
                     "trial": trial.id, "method": final["method"], "global": final["global"],
                     "sparsity": final["sparsity"], "path": final["path"],
                     "accuracy": final["accuracy"], "params": final["params"],
                     "training": training, "reported": final,
                     "minutes": round((trial.end - trial.start) / 60000, 2)})
    return rows


def experiment_settings(args):
    """(search space, settings) of the experiment --engine nni would run, after refusing
    what it cannot run; the settings are what experiment.json records to resume by."""
    if args.max_drop is None:
        raise UserError("--engine nni: needs --max-drop (the budget of the objective)")
    for given, flag in ((args.search, "--search"), (args.mobilenet_v2, "--mobilenet-v2")):
        if given:
            raise UserError(f"{flag}: not with --engine nni (the plain sweep runs it)")
    methods = args.methods or [("l1", False)]
    space = search_space(methods, args.sparsities)
    check_teacher(args, methods)
    if args.nni_config and not os.path.isfile(args.nni_config):
        raise UserError(f"--nni-config {args.nni_config}: no such file")
    report = os.path.join(args.output_dir, "sweep.json")
    if os.path.isfile(report):
        read_report(report, "nni")
    try:
        os.makedirs(os.path.join(args.output_dir, "nni"), exist_ok=True)
    except OSError as error:
        raise UserError(f"--output-dir {args.output_dir}: cannot write there "
                        f"({error.strerror})") from None
    return space, {"training": training_settings(args), "search_space": space,
                   "max_drop": args.max_drop, "trials": args.trials,
                   "concurrency": args.concurrency,
                   "nni_config": args.nni_config and os.path.abspath(args.nni_config)}


def read_state(state_path, settings, output_dir):
    """experiment.json of an earlier run ({} if none), refused if it is not one or was
    recorded with other settings."""
    if not os.path.isfile(state_path):
        return {}
    try:
        with open(state_path) as file:
            state = json.load(file)
        if not (isinstance(state["settings"], dict) and isinstance(state["id"], str)
                and state["id"].replace("-", "").replace("_", "").isalnum()):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{state_path}: not an experiment's record; give another "
                        "--output-dir, or move it first") from None
    if state["settings"] != settings:
        changed = [key for key in settings if state["settings"].get(key) != settings[key]]
        raise UserError(f"{output_dir}: holds the NNI experiment {state['id']} of other "
                        f"settings ({', '.join(changed)}); give another --output-dir")
    return state


def summarise(trials, experiment_id, settings, epochs):
    """experiment.json's record of the ended experiment: every trial, and the assessor's
    savings; its summary printed as one line."""
    stopped, saved = experiment.assessor_savings(trials, epochs)
    finished, failed = sum(t.succeeded for t in trials), sum(t.failed for t in trials)
    summary = (f"{len(trials)} trials: {finished} finished, {stopped} stopped early "
               f"by the assessor (~{saved / 60:.1f} min of distillation saved), {failed} failed")
    print(summary, flush=True)
    return {"id": experiment_id, "settings": settings, "summary": summary,
            "assessor_stopped": stopped, "assessor_saved_seconds": round(saved, 1),
            "trials": [dataclasses.asdict(t) for t in trials]}


def collect(trials, record, args):
    """The finished trials' students and the dense model measured together into sweep.json
    and sweep.png, as the plain sweep does; the pick copied to OUTPUT_DIR/SETTING.pth, its
    path in record["picked_copy"] in place of an earlier run's pick (that copy removed)."""
    earlier_copy = record.get("picked_copy")
    done = reported_rows(trials, record["settings"]["training"])
    if not done:
        raise CheckFailed(f"no trial of the experiment {record['id']} finished; see "
                          f"{os.path.join(args.output_dir, 'experiment.json')}")
    copies = {row["name"]: os.path.join(args.output_dir, f"{row['reported']['name']}.pth")
              for row in done}
    for copy in copies.values():  # refused now, not after the measurement
        if os.path.exists(copy) and copy != earlier_copy:
            raise UserError(f"{copy}: exists, and the picked trial's student may be copied "
                            "there; move it first")
    rows, dense = measure(done, args, os.path.join(args.output_dir, "compare.json"))
    chosen = present(rows, dense, args)
    write_json([dense, *rows], os.path.join(args.output_dir, "sweep.json"))
    if earlier_copy and os.path.exists(earlier_copy):
        os.remove(earlier_copy)
    record.pop("picked_copy", None)
    if chosen:
        record["picked_copy"] = copies[chosen["name"]]
        with open(chosen["path"], "rb") as source:
            atomic_write(record["picked_copy"], lambda file: shutil.copyfileobj(source, file))
        print(f"Copied the picked trial's student to {record['picked_copy']}")


def run_experiment(args):
    """The search as an NNI experiment: start or resume it, follow its trials, then measure
    the finished students together and pick, as the plain sweep does."""
    space, settings = experiment_settings(args)
    state_path = os.path.join(args.output_dir, "experiment.json")
    state = read_state(state_path, settings, args.output_dir)
    experiment_id = state.get("id") or experiment.new_id()
    with quiet_nni(args.verbose):
        config = experiment.make_config(
            args.nni_config, lambda concurrency: trial_command(args, concurrency),
            os.path.dirname(os.path.abspath(__file__)), space, args.trials, args.concurrency,
            assessor_start=max(1, args.kd_epochs // 2), seed=args.seed,
            working_directory=os.path.abspath(os.path.join(args.output_dir, "nni")))
    run = experiment.NniExperiment(config, experiment_id, args.host, args.port, args.verbose)
    total = config.max_trial_number
    try:
        how = run.start()
        write_json({"id": experiment_id, "settings": settings, **{
            key: state[key] for key in ("picked_copy",) if key in state}}, state_path)
        print(f"NNI experiment {experiment_id} {how}: {total} trials of "
              f"{' / '.join(space['method']['_value'])} at sparsity {min(args.sparsities):g}.."
              f"{max(args.sparsities):g}, {config.trial_concurrency} at a time, "
              f"{args.kd_epochs} distillation epochs each\nWeb portal: "
              f"http://{args.host}:{args.port}  (trials' files: "
              f"{os.path.join(args.output_dir, 'trials')}/)", flush=True)
        with tqdm(total=total, desc="trials finished", unit="trial") as bar, \
                experiment.interrupting_signals():
            for trial in run.follow():
                bar.write(describe_trial(trial, args.kd_epochs))
                bar.n = sum(t.status in experiment.FINISHED for t in run.latest)
                bar.refresh()
        trials = run.latest
    except KeyboardInterrupt:  # (the manager is stopped below)
        raise Interrupted(f"stopped the NNI experiment {experiment_id}, its manager and its "
                          f"trials; run the same command again to resume it (finished trials "
                          "are kept)") from None
    finally:
        if run.running:
            run.stop()
    for trial in trials:  # a trial the assessor stopped never continues: its state goes
        if trial.status == "EARLY_STOPPED":
            folder = os.path.join(args.output_dir, "trials", trial.id)
            for leftover in glob.glob(os.path.join(folder, "*.state.pth")):
                os.remove(leftover)
    record = summarise(trials, experiment_id, settings, args.kd_epochs)
    if "picked_copy" in state:  # an earlier run's pick: kept until collect() replaces it
        record["picked_copy"] = state["picked_copy"]
    write_json(record, state_path)
    collect(trials, record, args)
    write_json(record, state_path)
    print(f"Saved {os.path.join(args.output_dir, 'sweep.json')}, "
          f"{os.path.join(args.output_dir, 'sweep.png')} and {state_path}")


def check_teacher(args, methods):
    """The dense checkpoint, refused now for what the stages would refuse later."""
    dense_checkpoint = load_checkpoint(args.weights, kinds=("dense",))
    check_made_for(dense_checkpoint, args.weights, "--image-size", image_size=args.image_size)
    for method, _ in methods:
        pruner.check_rankable(dense_checkpoint, args.weights, method, "--methods")
    return dense_checkpoint


def main(args):
    if args.nni_trial:
        return run_trial(args)
    if args.engine == "nni":
        return run_experiment(args)
    if args.search and args.max_drop is None:
        raise UserError("--search: needs --max-drop (the budget the sparsity must stay within)")
    methods = args.methods or [("l1", False)]
    dense_checkpoint = check_teacher(args, methods)
    dense_accuracy = dense_checkpoint["metrics"].get("val_accuracy")
    if args.search and dense_accuracy is None:
        raise UserError(f"{args.weights}: records no validation accuracy to --search against")
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

    left_out = [name for name in sweep.rows if not sweep.done(name)]
    if left_out:
        print(f"Left out (distilled with other settings, or their file is gone): "
              f"{', '.join(left_out)}; their rows leave sweep.json, their files stay")
    done = [dict(row, path=sweep.student(name)) for name, row in sweep.rows.items()
            if name not in left_out]
    rows, dense = measure(done, args, os.path.join(args.output_dir, "compare.json"))
    present(rows, dense, args)
    sweep.rows = {row["name"]: row for row in rows}
    sweep.save(dense)
    print(f"Saved {sweep.report} and {os.path.join(args.output_dir, 'sweep.png')}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
