"""The plain sweep: prune and distil each setting from one teacher, measure them all together.

- `Sweep`: the settings' rows (sweep.json), kept on disk after every setting so that
  the same command resumes; a setting already distilled with the same training
  settings is not run again. Each student is shipped (exported and calibrated as
  export.py does) unless the sweep decides by PyTorch, and counted by its accuracy in
  the target runtime.
- `bisect_sparsity()`: bisect a method's sparsity for the largest within the --max-drop budget.
- `run_sweep()`: all of it, then the candidates measured together and the pick
  (candidates.measure_candidates(), candidates.present()).

    setup = SweepSetup(Teacher.load("vgg16Net.pth"), "dataset", Recipe(epochs=3, lr=1e-4),
                       target="int8")
    sweep = Sweep(setup, "sweep")
    sweep.run(Setting("l1", sparsity=0.7))

(One setting's pruning and distillation: setting.py.)
"""
from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Sequence

from compress.checkpoints import (load_checkpoint, model_from_checkpoint, output_path,
                                  saved_bytes, write_json)
from compress.cli import Interrupted, UserError
from compress.machine.resources import check_room
from compress.measure.intervals import budget_points, describe_difference
from compress.sweep.candidates import (SweepSetup, comparable_training, measure_candidates,
                                      paired, save_rows)
from compress.sweep.decision import SELECTION_SPLIT, mark_pareto, present
from compress.sweep.halving import continue_setting, dense_hits, standing
from compress.sweep.report import SweepRow, in_pytorch
from compress.sweep.rules import survivors, within_budget
from compress.sweep.setting import Setting, check_outputs, prune_and_distil
from compress.sweep.stepwise import prune_in_steps
from compress.sweep.targets import TARGETS, ship, target_accuracy
from model import MOBILENET_V2, count_parameters


def read_report(path: str, engine: str) -> list[SweepRow]:
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
    """The settings' rows (sweep.json in `output_dir`), kept on disk after every setting so
    a sweep of `setup` resumes: a setting already distilled with the same training
    settings is not run again."""

    def __init__(self, setup: SweepSetup, output_dir: str):
        self.setup, self.output_dir = setup, output_dir
        self.training = setup.training_settings()
        self.report = os.path.join(output_dir, "sweep.json")
        self.rows = {}
        self.shipped = set()  # the settings in_target() has seen in this run
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise UserError(f"--output-dir {output_dir}: exists and is not a folder")
        if os.path.isfile(self.report):
            self.rows = {row["name"]: row for row in read_report(self.report, "plain")}

    def student(self, name: str) -> str:
        """Where setting `name`'s student is written: OUTPUT_DIR/NAME.pth."""
        return os.path.join(self.output_dir, f"{name}.pth")

    def done(self, name: str) -> bool:
        """Whether `name` was distilled with this sweep's training settings, its file there."""
        row = self.rows.get(name)
        return (row is not None and os.path.isfile(self.student(name))
                and comparable_training(row["training"]) == self.training)

    def run(self, setting: Setting, position: str = "", ship: bool = True) -> SweepRow:
        """Prune and distil one setting (unless done before); returns its row, its accuracy
        that of the target runtime (in_target()) if `ship`, else PyTorch's."""
        name = setting.name
        if self.done(name):
            if ship:
                self.in_target(name)
            print(f"{name}: done before ({self.rows[name]['accuracy']:.1%}), not run again")
            return self.rows[name]
        started = time.perf_counter()
        student = self.student(name)
        for stale in glob.glob(glob.escape(output_path(student, "stage")) + "[0-9]*"):
            os.remove(stale)  # (a later stage's start, kept by a run of other settings)
        print(f"\n=== {name} ({position}) ===", flush=True)
        try:
            (prune_in_steps if setting.steps > 1 else prune_and_distil)(self.setup, student,
                                                                        setting)
        except Interrupted:
            raise Interrupted(f"Stopped while distilling {name}; its state is saved: run the "
                              "same sweep.py command again to continue (finished settings are "
                              "not run again)") from None
        checkpoint = load_checkpoint(student, kinds=("finetuned",))
        self.rows[name] = {"name": name, "method": setting.method or MOBILENET_V2,
                           "global": setting.global_ranking, "sparsity": setting.sparsity,
                           "steps": setting.steps, "latency_target_ms": setting.latency_ms,
                           "path": student,
                           "accuracy": checkpoint["metrics"]["val_accuracy"],
                           "params": count_parameters(model_from_checkpoint(checkpoint, student)),
                           "training": self.training, "epochs": self.setup.recipe.epochs,
                           "stages": [{"epochs": self.setup.recipe.epochs}],
                           "minutes": round((time.perf_counter() - started) / 60, 2)}
        self.save()  # (a Ctrl-C while it is shipped must not lose the distillation)
        if ship:
            self.in_target(name)
            self.save()
        self.print_progress()
        return self.rows[name]

    def run_stages(self, names: list[str], max_drop: float | None) -> None:
        """Successive halving (halving.py) of the settings `names`, distilled for the first
        stage: after each stage the survivors continue for the next one's epochs. Each row
        records its stages ("stages": each one's epochs, and after it the student's val
        accuracy, paired difference from the dense model, multiply-adds and whether it
        continued)."""
        stages = self.setup.stages
        reference = []

        def stood(name, stage):  # the standing after `stage` stages, measured once
            entry = self.rows[name]["stages"][stage - 1]
            if "vs_dense" not in entry:
                reference[:] = reference or dense_hits(self.setup)
                entry.update(standing(self.setup, self.student(name), reference))
                self.save()
            return entry
        for stage in range(1, len(stages)):
            standings = {name: stood(name, stage) for name in names}
            kept = survivors(standings, max_drop)
            for name in names:
                standings[name]["continued"] = name in kept
            self.save()
            print(f"\nAfter stage {stage} of {len(stages)} ({epochs_of(sum(stages[:stage]))}), "
                  f"against the dense model on {SELECTION_SPLIT}: "
                  + ", ".join(f"{name} {describe_difference(standings[name]['vs_dense'])}"
                              for name in names)
                  + f". {', '.join(kept)} continue{'s' if len(kept) == 1 else ''} for "
                    f"{stages[stage]} epochs.", flush=True)
            for number, name in enumerate(kept, 1):
                row = self.rows[name]
                if len(row["stages"]) > stage:  # (that stage ran before a resume)
                    continue
                print(f"\n=== {name} (stage {stage + 1} of {len(stages)}: {number} of "
                      f"{len(kept)}) ===", flush=True)
                started = time.perf_counter()
                try:
                    continue_setting(self.setup, self.student(name), stages, stage)
                except Interrupted:
                    raise Interrupted(f"Stopped while distilling {name} (stage {stage + 1}); its "
                                      "state is saved: run the same sweep.py command again to "
                                      "continue") from None
                checkpoint = load_checkpoint(self.student(name), kinds=("finetuned",))
                row["stages"].append({"epochs": stages[stage]})
                row.update(accuracy=checkpoint["metrics"]["val_accuracy"],
                           epochs=sum(stages[:stage + 1]),
                           minutes=round(row["minutes"] + (time.perf_counter() - started) / 60, 2))
                self.save()
            names = kept
        for name in names:  # (the last stage's standing: the table shows every stage)
            stood(name, len(stages))

    def trim_stages(self) -> None:
        """Rows whose later stages ran with other epochs than this run's --kd-epochs go back
        to their student after the stages that agree (NAME.stageK.pth), so that those stages
        run again as asked; the copies of the stages after it are removed."""
        plan = self.setup.stages
        for name, row in self.rows.items():
            done = row.setdefault("stages", [{"epochs": row.get("epochs",
                                                                row["training"]["epochs"])}])
            agree = 0
            while agree < min(len(done), len(plan)) and done[agree]["epochs"] == plan[agree]:
                agree += 1
            if agree == len(done) or agree == 0:  # (0: another first stage, run again whole)
                continue
            student = self.student(name)
            kept = output_path(student, f"stage{agree}.pth")
            for path, copy in ((kept, student), (output_path(kept, "history.json"),
                                                 output_path(student, "history.json"))):
                if os.path.isfile(path):
                    os.replace(path, copy)
            for later in range(agree + 1, len(done)):
                for path in (output_path(student, f"stage{later}.pth"),
                             output_path(student, f"stage{later}.history.json")):
                    if os.path.isfile(path):
                        os.remove(path)
            checkpoint = load_checkpoint(student, kinds=("finetuned",))
            del done[agree:]
            row.update(accuracy=checkpoint["metrics"]["val_accuracy"],
                       epochs=sum(plan[:agree]))
            self.shipped.discard(name)
            print(f"{name}: back to its student after {sum(plan[:agree])} epochs (its later "
                  "stages ran with other --kd-epochs)")
        self.save()

    def in_target(self, name: str) -> None:
        """Setting `name`'s student shipped (unless the target is PyTorch, or its files are
        current) and its row's accuracy that of the target runtime."""
        if name in self.shipped:
            return
        row, setup = self.rows[name], self.setup
        by_runtime = row.setdefault("accuracy_by_runtime", {"pytorch": row["accuracy"]})
        if setup.target != "pytorch":
            path = self.student(name)
            measured = setup.ship_student(path)
            if measured:
                by_runtime.update(measured)
            elif setup.target not in by_runtime:
                by_runtime[setup.target] = target_accuracy(
                    path, setup.target, data=setup.data, batch_size=setup.recipe.batch_size,
                    workers=setup.recipe.workers)
        row["accuracy"] = by_runtime[setup.target]
        self.shipped.add(name)

    def print_progress(self) -> None:
        """The settings distilled so far, as a running table."""
        print(f"\n{'setting':<22}{'val acc':>9}{'params':>10}{'minutes':>9}")
        for row in self.rows.values():
            print(f"{row['name']:<22}{row['accuracy']:>9.1%}{row['params'] / 1e6:>9.2f}M"
                  f"{row['minutes']:>9.1f}")
        print(flush=True)

    def save(self, dense: dict | None = None) -> None:
        """sweep.json: the dense row (if given), then every setting's."""
        rows = ([dense] if dense else []) + list(self.rows.values())
        write_json(rows, self.report)


def bisect_sparsity(sweep: Sweep, method: str, global_ranking: bool, dense_accuracy: float,
           max_drop: float, steps: int) -> float:
    """The largest sparsity of `method` whose student stays within `max_drop` points of
    the dense accuracy, by bisection between 0 (the dense model) and 1; each probe is a
    setting of `sweep`."""
    low, high = 0.0, 1.0
    for step in range(steps):
        sparsity = round((low + high) / 2, 4)
        row = sweep.run(Setting(method, global_ranking, sparsity),
                        f"search step {step + 1} of {steps}")
        within = within_budget(row["accuracy"], dense_accuracy, max_drop)
        print(f"search: sparsity {sparsity:g} is {'within' if within else 'outside'} the "
              f"{max_drop:g}-point budget ({row['accuracy']:.1%} vs dense {dense_accuracy:.1%})")
        low, high = (sparsity, high) if within else (low, sparsity)
    return low


def students_bytes(setup: SweepSetup, settings: Sequence[Setting]) -> float:
    """About how much the files of `settings` take: each pruned model, its student and its
    fp32 ONNX file about (1 - sparsity) of the dense model (channel pruning shrinks the
    first linear layer, most of VGG's weights, in proportion), its int8 file a quarter
    of that (a 2-class MobileNetV2: 9 MB, 9 MB and 2.3 MB); each step before the last of
    an iterative setting a pruned model and a student of the widths it keeps."""
    dense = saved_bytes(setup.teacher.checkpoint["state_dict"])
    return sum(21 * 2 ** 20 if setting.method is None else
               3.25 * 0.5 * dense if setting.sparsity is None else  # (a latency: not known yet)
               (3.25 * (1 - setting.sparsity) + sum(
                   2 * (1 - setting.sparsity) ** (step / setting.steps)
                   for step in range(1, setting.steps))) * dense
               for setting in settings)


def run_sweep(setup: SweepSetup, settings: Sequence[Setting], output_dir: str, *,
              max_drop: float | None = None, bisect: tuple[str, bool] | None = None,
              bisect_steps: int = 4) -> tuple[list[SweepRow], SweepRow]:
    """sweep.py's plain engine: every setting (unless done before), then with `bisect`
    (method, global ranking) a search of its sparsity within `max_drop`, then all the
    students of `output_dir` distilled alike measured together with the dense model
    (sweep.json, sweep.png, compare.json/.png). Returns (rows, dense row)."""
    sweep = Sweep(setup, output_dir)
    for setting in settings:  # now, not after the settings before it have run
        if not sweep.done(setting.name):
            check_outputs(sweep.student(setting.name), setting)
    check_room(output_dir, students_bytes(setup, [s for s in settings if not sweep.done(s.name)]),
               "the settings' pruned models, students and ONNX files")
    os.makedirs(output_dir, exist_ok=True)
    staged = len(setup.stages) > 1
    epochs = (f"{epochs_of(setup.stages[0])} of distillation each, then successive halving "
              "for " + " and ".join(map(str, setup.stages[1:])) + " more" if staged else
              f"{epochs_of(setup.recipe.epochs)} of distillation each")
    print(f"Sweep of {len(settings)} settings{' and a search' if bisect else ''} from "
          f"{setup.teacher.path}, {epochs}, into {output_dir}/", flush=True)
    sweep.trim_stages()
    for number, setting in enumerate(settings, 1):
        sweep.run(setting, f"setting {number} of {len(settings)}", ship=not staged)
    if staged:
        sweep.run_stages([setting.name for setting in settings], max_drop)
    if bisect:
        dense_accuracy = setup.teacher.checkpoint["metrics"]["val_accuracy"]
        found = bisect_sparsity(sweep, *bisect, dense_accuracy, max_drop, bisect_steps)
        print(f"search: the largest {bisect[0]} sparsity within {budget_points(max_drop)} is "
              f"{found:g}" if found else "search: no sparsity tried stays within the budget")

    left_out = [name for name in sweep.rows if not sweep.done(name)]
    if left_out:
        print(f"Left out (distilled with other settings, or their file is gone): "
              f"{', '.join(left_out)}; their rows leave sweep.json, their files stay")
    for name in sweep.rows:  # settings of earlier runs too (another --target, say)
        if name not in left_out:
            sweep.in_target(name)
    sweep.save()
    done = [dict(row, path=sweep.student(name)) for name, row in sweep.rows.items()
            if name not in left_out]
    rows, dense = measure_candidates(setup, done, os.path.join(output_dir, "compare.json"),
                                     output_dir)
    shipped = present(rows, dense, max_drop, output_dir)
    if shipped and setup.target == "pytorch":  # ready to ship, as the others were not
        setup.ship_student(shipped["path"])
    sweep.rows = {row["name"]: row for row in rows}
    sweep.save(dense)
    print_saved(output_dir, shipped)
    return rows, dense


def epochs_of(count: int) -> str:
    """'1 epoch', '5 epochs'."""
    return f"{count} epoch{'' if count == 1 else 's'}"


def print_saved(output_dir: str, shipped: SweepRow | None) -> None:
    """The sweep's last line: what it wrote, and the files that ship."""
    print(f"Saved {os.path.join(output_dir, 'sweep.json')} and "
          f"{os.path.join(output_dir, 'sweep.png')}"
          + (f"; {'the pick' if shipped['picked'] else 'over the budget, the run'} ships as "
             f"{shipped['path'][:-len('.pth')]}.onnx and .int8.onnx" if shipped else ""))


def pick_again(output_dir: str, max_drop: float, target: str | None, data: str,
               batch_size: int = 32, seed: int = 0) -> SweepRow:
    """sweep.py --pick-again: the rows of a finished sweep in `output_dir` decided again
    with `max_drop` and `target` (None: the one it measured), from what it measured
    (nothing distilled or timed again; a PyTorch pick is exported, as the sweep exports
    it). Returns the row shipped."""
    report = os.path.join(output_dir, "sweep.json")
    try:
        with open(report) as file:
            stored = json.load(file)
        [dense] = [row for row in stored if row.get("kind") == "dense"]
        rows = [row for row in stored if row is not dense]
        if not rows or not all("budget" in row and "latency_ms" in row for row in rows):
            raise ValueError
    except (OSError, ValueError, TypeError, AttributeError):
        raise UserError(f"--pick-again: {report}: not the report of a finished sweep (run the "
                        "sweep to its end first)") from None
    measured = dense.get("target", "pytorch")
    target = target or measured
    if target != measured and (target != "pytorch" or "pytorch" not in dense):
        raise UserError(f"--pick-again --target {target}: {report} measured "
                        f"{TARGETS[measured].name}"
                        + (" and PyTorch" if "pytorch" in dense else "")
                        + f"; run the sweep with --target {target}")
    reference = in_pytorch(dense)["by_split"]
    dense, *rows = [in_runtime(row, target, reference, seed) for row in [dense, *rows]]
    mark_pareto(rows)
    shipped = present(rows, dense, max_drop, output_dir)
    if target == "pytorch":
        ship(shipped["path"], data=data, batch_size=batch_size, seed=seed)
    save_rows(rows, dense, report)
    print_saved(output_dir, shipped)
    return shipped


def in_runtime(row: SweepRow, target: str, reference: dict, seed: int) -> SweepRow:
    """A row of sweep.json as `target` measured it (its "pytorch" figures for PyTorch where
    the sweep measured another runtime), its paired differences from the dense model in
    PyTorch (`reference`: its by_split figures) computed again from the stored hits."""
    figures = dict(row)
    if target == "pytorch" and "pytorch" in row:
        figures.pop("pytorch")
        figures.update(row["pytorch"], target="pytorch", file=row["pytorch"]["path"])
    figures["difference"] = paired(reference, figures, figures["split"], seed)
    figures["budget"] = paired(reference, figures, SELECTION_SPLIT, seed)
    return figures
