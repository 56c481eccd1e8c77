"""Stage 7: how small, how fast, for how much accuracy -- choose by measurement.

Reads  WEIGHTS (vgg16Net.pth)           the dense checkpoint from train.py
       DATA/train/, DATA/val/           (made by split_dataset.py)
Writes OUTPUT_DIR/ (sweep/)             per setting NAME (l1-0.5, slim-global-0.7, ...):
         NAME.pruned.pth                  pruner.py's output (and .channels.png)
         NAME.pth                         the student distilled by knowledge_distillation.py
                                          (and .history.json/.png)
         NAME.onnx, NAME.int8.onnx        the student as export.py ships it (--target int8
                                          or onnx: every student; pytorch: the pick's only)
       OUTPUT_DIR/dense.onnx, .int8.onnx  the dense model, exported alike (int8, onnx)
       OUTPUT_DIR/sweep.json            the dense model's object, then one per setting: method,
                                        sparsity, accuracy, params, FLOPs, file size, latency,
                                        throughput, path (the .pth), file (what was measured),
                                        and the same figures in PyTorch ("pytorch")
       OUTPUT_DIR/sweep.png             accuracy against latency and against parameters,
                                        the Pareto front marked, the dense model for reference
       OUTPUT_DIR/compare.json/.png     test.py --compare's report of the same run (and
                                        compare.pytorch.json/.png, the models in PyTorch)
       OUTPUT_DIR/teacher_logits.KEY.pt the teacher's answers for every training picture and
                                        epoch, computed once and read back by every setting
                                        (safe to delete); dense_evaluation.KEY.json likewise
                                        the dense model's accuracy

Each setting is pruned (as pruner.py prunes), distilled from the dense teacher for
--kd-epochs (as knowledge_distillation.py distils; the teacher is loaded once), then
all of them and the dense model are measured together as they would ship (--target:
int8 ONNX files in onnxruntime, by default), exactly as test.py --compare measures:
accuracy on DATA/val, and latency timed interleaved so that the models
are compared under the same conditions. The --max-drop budget counts from the dense
model's accuracy in PyTorch. A setting already distilled is not run
again: run the same command after Ctrl-C, or with more settings, and only what is
missing runs (timing is always redone, as timings are only comparable within one
run). The report holds every setting distilled in OUTPUT_DIR from the same teacher
with the same distillation flags, earlier runs' too. One run at a time writes in
OUTPUT_DIR (a second one is refused while the first runs).

--max-drop D names the fastest model within D points of the dense accuracy;
--search METHOD bisects the sparsity of METHOD for the largest one within that
budget. --engine nni runs the search as an NNI experiment instead (a TPE tuner
proposes settings, a Medianstop assessor stops trials that fall behind, trials
run --concurrency at a time, on this machine or on NNI's other training services
through --nni-config); its results land in the same sweep.json and sweep.png.
With several --kd-epochs, the experiment runs the plain sweep's successive halving
of --methods x --sparsities instead (an advisor of ours in place of the tuner and
the assessor, each stage of a setting a trial).
(The library: compress/sweep/, plain.py, experiment.py, trial.py, nni_halving.py.)

    python sweep.py                                   # l1 at 0.5, 0.7, 0.9; 3 KD epochs
    python sweep.py --methods l1 slim:global --sparsities 0.5 0.7 --mobilenet-v2
    python sweep.py --sparsities 0.7 --prune-steps 1 3 --kd-epochs 6   # one-shot vs 3 steps
    python sweep.py --sparsities 0.7 0.9 --match-latency   # widths allocated per layer for
                                                           # the time each uniform one takes
    python sweep.py --max-drop 1.0 --search l1
    python sweep.py --engine nni --max-drop 1.0 --methods l1 taylor --sparsities 0.5 0.9
"""
import argparse
import os
import shlex
import sys
import textwrap

from compress.cli import (DISTILLATION_FLAGS, UserError, add_data_args, add_shared_flags,
                          add_timing_args, add_verbose_arg, fraction, int_within, make_parser,
                          points, positive_float, positive_int, run_cli)
from compress.data.pictures import find_classes
from compress.machine.resources import check_writable, output_lock
from compress.measure.timing import PRECISION
from compress.pruning.allocation import FLOOR, reachable_ms
from compress.pruning.channels import METHODS, uniform_widths
from compress.pruning.latency import widths_of, with_widths
from compress.sweep import trial
from compress.sweep.candidates import SweepSetup, Teacher
from compress.sweep.experiment import SPARSITY_STEP, ExperimentPlan, run_experiment, search_space
from compress.sweep.nni_config import ASSESSOR, TUNER
from compress.sweep.plain import pick_again, run_sweep
from compress.sweep.setting import Setting, method_setting
from compress.sweep.targets import TARGETS


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, batch_size=32, training=True)
    parser.add_argument("--weights", default="vgg16Net.pth", help="dense checkpoint (the teacher)")
    parser.add_argument("--methods", nargs="+", type=method_setting, metavar="METHOD[:global]",
                        help="pruner.py --method of each setting (" + ", ".join(METHODS)
                             + "); METHOD:global adds --global (default: l1)")
    parser.add_argument("--sparsities", nargs="+", type=fraction, default=[0.5, 0.7, 0.9],
                        metavar="S", help="pruner.py --sparsity values, each tried with every "
                                          "method")
    parser.add_argument("--prune-steps", nargs="+", type=int_within(1, "1 or more"), default=[1],
                        metavar="N",
                        help="reach each sparsity in N prune-then-distil steps (each setting "
                             "tried with every N): the same final widths as one cut, the "
                             "--kd-epochs shared out between the steps; the channels ranked "
                             "afresh each step (not with METHOD:global)")
    parser.add_argument("--latencies", nargs="+", type=positive_float, default=[], metavar="MS",
                        help="also settings pruned to a latency (pruner.py --latency): each "
                             "layer's width chosen for the time a forward pass takes on this "
                             "CPU in --target's runtime at batch 1 (int8 or pytorch), the "
                             "channels that matter least per millisecond removed first")
    parser.add_argument("--speedups", nargs="+", type=positive_float, default=[], metavar="X",
                        help="... or X times faster than the dense model (predicted)")
    parser.add_argument("--match-latency", action="store_true",
                        help="also, for each of --sparsities, a setting pruned to the latency "
                             "the latency model predicts for that uniform sparsity: the two "
                             "distilled alike and measured side by side")
    parser.add_argument("--mobilenet-v2", action="store_true",
                        help="also distil a MobileNetV2 student (knowledge_distillation.py "
                             "--student-arch mobilenet_v2)")
    parser.add_argument("--kd-epochs", nargs="+", type=positive_int, default=[3], metavar="E",
                        help="distillation epochs of each setting; several numbers: successive "
                             "halving -- every setting distils for the first, then half of them "
                             "for the next number, and so on: by their paired difference from "
                             "the dense model on val, those within reach of --max-drop, the "
                             "fastest first, then the most accurate (the learning-rate schedule "
                             "planned again over each stage, the pictures going on where they "
                             "stopped)")
    add_shared_flags(parser, "--lr", *DISTILLATION_FLAGS, lr={"default": 1e-4})
    parser.add_argument("--max-drop", type=points, metavar="POINTS",
                        help="name the fastest model within POINTS of the dense accuracy")
    parser.add_argument("--pick-again", action="store_true",
                        help="with --max-drop: decide again from the finished sweep in "
                             "--output-dir, by this budget and --target (pytorch, or the one it "
                             "measured), from what it measured: nothing is distilled or timed "
                             "again (seconds)")
    parser.add_argument("--search", type=method_setting, metavar="METHOD[:global]",
                        help="with --max-drop: bisect METHOD's sparsity for the largest within "
                             "the budget (each probe is a setting of its own)")
    parser.add_argument("--search-steps", type=int_within(1, "1 to 10", 10), default=4,
                        help="--search: sparsities tried (at most 10: 1/1024 apart)")
    parser.add_argument("--target", choices=TARGETS,
                        help="what the models are measured as, and the pick decided by: "
                             + "; ".join(f"{name}: {target.measures}"
                                         for name, target in TARGETS.items())
                             + ". int8 and onnx export every candidate (and the dense model) as "
                               "export.py does, beside its .pth; pytorch exports the pick "
                               "only (default: int8; with --pick-again, what the sweep "
                               "measured)")
    parser.add_argument("--output-dir", default="sweep", help="folder of the sweep's files")
    add_timing_args(parser, PRECISION)
    add_verbose_arg(parser)
    engine = parser.add_argument_group("--engine nni", textwrap.fill(
        "An NNI experiment searches --methods x the sparsity range of "
        "--sparsities (from the smallest to the largest, in steps of "
        f"{SPARSITY_STEP:g}) for the fastest student within --max-drop (needed): NNI's "
        f"{TUNER} tuner proposes settings, its {ASSESSOR} assessor "
        "stops a trial whose best validation accuracy falls below the median of the finished "
        "trials' (from half its epochs on, not after its last). The objective each trial "
        "reports (maximised): how many times faster than the dense model at batch 1 it is "
        "(the two timed together in the trial) if within the budget, else minus the points "
        "it is over the budget. Trials write OUTPUT_DIR/trials/TRIAL_ID/; NNI keeps its "
        "files in OUTPUT_DIR/nni/. The finished students are then measured together as in "
        "the plain sweep (sweep.json, sweep.png), the picked one copied to "
        "OUTPUT_DIR/NAME.pth. Run the same command again to resume a stopped experiment. "
        "With several --kd-epochs: successive halving as the plain sweep runs it, of "
        "--methods x --sparsities as listed, each stage of a setting a trial that continues "
        "the student of its last; an advisor of ours decides which continue, in place of the "
        "tuner and the assessor.",
        width=76))
    engine.add_argument("--engine", choices=["plain", "nni"], default="plain",
                        help="plain: every setting in turn, in this process; nni: an NNI "
                             "experiment")
    engine.add_argument("--trials", type=positive_int, default=8,
                        help="trials of the experiment (its maxTrialNumber; with several "
                             "--kd-epochs, as many as the halving runs)")
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


# flags of the experiment as a whole, which no trial takes (a trial is one setting)
EXPERIMENT_FLAGS = {"--help", "--methods", "--sparsities", "--prune-steps", "--mobilenet-v2",
                    "--latencies", "--speedups", "--match-latency", "--search",
                    "--search-steps", "--engine", "--trials", "--port", "--host", "--nni-config",
                    "--pick-again"}
# flags naming files: a trial gets them by absolute path (NNI runs trials in this folder)
PATH_FLAGS = {"--data", "--weights", "--output-dir", "--tensorboard"}


def trial_command(parser, args, concurrency):
    """The command NNI runs for each trial: this script with every flag the user's command
    parsed (read from the parser itself, so that a new flag reaches the trials), but those
    of the experiment as a whole, its files by absolute path."""
    argv = []
    for action in parser._actions:  # (argparse's own list of what it parses)
        flag = max(action.option_strings, key=len, default=None)
        if flag is None or flag in EXPERIMENT_FLAGS or flag == "--nni-trial":
            continue
        value = concurrency if flag == "--concurrency" else getattr(args, action.dest)
        if flag in PATH_FLAGS and value is not None:
            value = os.path.abspath(value)
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join([sys.executable, os.path.abspath(__file__), *argv, "--nni-trial"])


def check_data(folder):
    """Refuse a --data without train/ and val/ class folders before anything is pruned."""
    for part in ("train", "val"):
        find_classes(os.path.join(folder, part))


def setup_of(args, methods=()):
    """What every setting shares, the teacher loaded (once) and checked against `methods`."""
    return SweepSetup.from_args(args, Teacher.load(args.weights, args.image_size, methods))


def main(args):
    if args.target is None and not args.pick_again:
        args.target = "int8"
    if args.nni_trial:  # (its experiment holds OUTPUT_DIR's lock; the trial writes trials/ID/)
        trial.check_run_by_nni()  # before the teacher is loaded
        return trial.run_trial(setup_of(args), args.output_dir, args.max_drop, args.concurrency)
    check_writable(args.output_dir, "--output-dir", folder=True)
    with output_lock(args.output_dir, "--output-dir", folder=True):
        if args.pick_again:
            if args.max_drop is None:
                raise UserError("--pick-again: needs --max-drop (the budget to decide by)")
            pick_again(args.output_dir, args.max_drop, args.target, args.data, args.batch_size,
                       args.seed)
        else:
            sweep(args)


def latency_targets(args, setup):
    """The latency settings' targets in ms: --latencies, --speedups against the dense model's
    predicted time, and with --match-latency each uniform sparsity's predicted time."""
    if not (args.latencies or args.speedups or args.match_latency):
        return []
    if any(global_ranking for _, global_ranking in args.methods or []):
        raise UserError("--latencies, --speedups, --match-latency: each layer's width is "
                        "allocated by the latency model, which a global ranking would override; "
                        "drop :global")
    model = setup.latency_model()
    architecture = setup.teacher.checkpoint["architecture"]
    dense = widths_of(architecture)
    least = reachable_ms(model, architecture)
    given = [(f"--latencies {ms:g}", ms) for ms in args.latencies]
    given += [(f"--speedups {x:g}", model.predict(architecture) / x) for x in args.speedups]
    for flag, target in given:  # (refused before any work, not after the settings before it)
        if target < least:
            raise UserError(f"{flag}: {target:.2f} ms is below what an allocation reaches here "
                            f"({least:.2f} ms predicted with every layer at its narrowest: "
                            f"{FLOOR:.0%} of its channels)")
    targets = [target for _, target in given]
    if args.match_latency:
        for sparsity in args.sparsities:
            target = model.predict(with_widths(architecture, uniform_widths(dense, sparsity)))
            if target < least:  # (the uniform cut is narrower than an allocation may go)
                print(f"--match-latency: no latency setting for sparsity {sparsity:g}: its "
                      f"predicted {target:.2f} ms is below what an allocation reaches here "
                      f"({least:.2f} ms, every layer at {FLOOR:.0%} of its channels)",
                      flush=True)
            else:
                targets.append(target)
    return [round(target, 3) for target in targets]


def sweep(args):
    """The sweep or the experiment the flags ask for, in args.output_dir (locked by main())."""
    methods = args.methods or [("l1", False)]
    if args.engine == "nni":
        if args.max_drop is None:
            raise UserError("--engine nni: needs --max-drop (the budget of the objective)")
        for given, flag in ((args.search, "--search"), (args.mobilenet_v2, "--mobilenet-v2"),
                            (args.prune_steps != [1], "--prune-steps"),
                            (args.latencies or args.speedups or args.match_latency,
                             "--latencies, --speedups and --match-latency")):
            if given:
                raise UserError(f"{flag}: not with --engine nni (the plain sweep runs it)")
        plan = ExperimentPlan(methods, args.sparsities, args.max_drop, args.trials,
                              args.concurrency, args.host, args.port, args.nni_config)
        if len(args.kd_epochs) == 1:  # (a search of one setting is refused before any work)
            search_space(plan.methods, plan.sparsities)
        check_data(args.data)
        setup = setup_of(args, [method for method, _ in methods])
        return run_experiment(setup, plan, args.output_dir,
                              lambda concurrency: trial_command(get_args_parser(), args,
                                                                concurrency),
                              os.path.dirname(os.path.abspath(__file__)))
    if args.search and args.max_drop is None:
        raise UserError("--search: needs --max-drop (the budget the sparsity must stay within)")
    if args.search and len(args.kd_epochs) > 1:
        raise UserError("--search: not with several --kd-epochs (each probe decides the next "
                        "one by its own accuracy; successive halving decides between settings)")
    setup = setup_of(args, [method for method, _ in methods])
    if args.search and setup.teacher.checkpoint["metrics"].get("val_accuracy") is None:
        raise UserError(f"{args.weights}: records no validation accuracy to --search against")
    check_data(args.data)
    if any(steps > 1 for steps in args.prune_steps):
        if any(global_ranking for _, global_ranking in methods):
            raise UserError("--prune-steps: each step keeps per-layer widths, which a global "
                            "ranking sets only as it ranks; drop :global")
        if len(args.kd_epochs) > 1:
            raise UserError("--prune-steps: not with several --kd-epochs (successive halving "
                            "continues one student; the steps prune it again)")
        if args.kd_epochs[0] < max(args.prune_steps):
            raise UserError(f"--prune-steps {max(args.prune_steps)}: needs at least as many "
                            f"--kd-epochs (got {args.kd_epochs[0]}): each step distils for one "
                            "epoch or more")
    settings = [Setting(m, g, s, steps) for m, g in methods for s in args.sparsities
                for steps in args.prune_steps]
    settings += [Setting(method, latency_ms=ms) for method, _ in methods
                 for ms in latency_targets(args, setup)]
    if args.mobilenet_v2:
        settings.append(Setting(None))
    run_sweep(setup, settings, args.output_dir, max_drop=args.max_drop, bisect=args.search,
              bisect_steps=args.search_steps)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
