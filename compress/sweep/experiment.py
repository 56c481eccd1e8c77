"""sweep.py --engine nni: the search as an NNI experiment, launched and followed from here.

NNI's TPE tuner proposes settings (a method of --methods, a sparsity within the range
of --sparsities, in steps of SPARSITY_STEP), its Medianstop assessor stops trials that
fall behind, and each trial (trial.py, run by NNI as `sweep.py --nni-trial`) prunes,
distils and times its student and reports `objective()`. When the experiment ends,
the finished trials' students are measured together with the dense model exactly as
the plain sweep measures (candidates.measure_candidates), and the pick is copied beside them.

- `ExperimentPlan`: the experiment's flags (methods, sparsities, budget, trials,
  concurrency, where the manager listens, the user's NNI config).
- `run_experiment()`: start or resume it, follow its trials, then measure and pick;
  `experiment.json` records it so that the same command resumes it.
- `search_space()` / `objective()`: what the tuner searches and maximises.

With several --kd-epochs, successive halving instead (nni_halving.py's advisor in place of
the tuner and the assessor) of --methods x --sparsities as listed, as the plain sweep
runs them (their rows: halving.experiment_rows()).

(NNI's own mechanics, and the mends of NNI 3.0: nni_engine.py.)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Sequence

from tqdm import tqdm

from compress.checkpoints import atomic_write, is_checkpoint_file, write_json
from compress.cli import CheckFailed, Interrupted, UserError, quiet_nni
from compress.export.onnx_files import written_by_export
from compress.machine import processes
from compress.measure.intervals import describe_difference
from compress.sweep import nni_config, nni_engine
from compress.sweep.candidates import (SweepSetup, comparable_training, measure_candidates,
                                       save_rows)
from compress.sweep.decision import SELECTION_SPLIT, present
from compress.sweep.halving import experiment_rows, halving_settings, most_trials
from compress.sweep.plain import epochs_of, read_report
from compress.sweep.report import SweepRow
from compress.sweep.rules import within_budget
from compress.sweep.setting import method_setting, setting_name
from compress.sweep.targets import onnx_paths

SPARSITY_STEP = 0.025  # the sparsities the tuner may propose


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """What the experiment searches and how it runs: `methods` ((method, global) pairs) x
    the range of `sparsities`, for the fastest student within `max_drop` points; `trials`
    in all, `concurrency` at a time; NNI's manager on `host`:`port`; `nni_config` the
    user's NNI YAML (its settings win), if any."""
    methods: Sequence[tuple[str, bool]]
    sparsities: Sequence[float]
    max_drop: float
    trials: int = 8
    concurrency: int = 2
    host: str = "127.0.0.1"
    port: int = 8080
    nni_config: str | None = None


def search_space(methods: Sequence[tuple[str, bool]], sparsities: Sequence[float]) -> dict:
    """NNI's search space: --methods x the range of --sparsities (UserError if one point)."""
    low, high = min(sparsities), max(sparsities)
    names = [method + (":global" if global_ranking else "") for method, global_ranking in methods]
    if len(set(names)) == 1 and high - low < SPARSITY_STEP:
        raise UserError(f"--engine nni: the search space holds one setting ({names[0]} at "
                        f"{low:g}); give --sparsities a range (e.g. 0.5 0.9) or more --methods")
    return {"method": {"_type": "choice", "_value": sorted(set(names), key=names.index)},
            "sparsity": {"_type": "quniform", "_value": [low, high, SPARSITY_STEP]}}


def objective(accuracy: float, dense_accuracy: float, speedup: float, max_drop: float) -> float:
    """What an NNI trial reports to the tuner (maximised): `speedup` within the budget; minus
    the points over it outside, so every student within the budget beats every one outside,
    and a near miss beats a far one."""
    if within_budget(accuracy, dense_accuracy, max_drop):
        return speedup
    return -round(100 * (dense_accuracy - accuracy) - max_drop, 9)


def describe_trial(trial: nni_engine.Trial, stages: Sequence[int]) -> str:
    """One line on a trial's news (a trial's setting: from the parameters NNI gave it; its
    epochs those of its stage)."""
    stage = (trial.parameters or {}).get("stage")
    epochs = stages[stage or 0]
    if trial.parameters:
        method, global_ranking = method_setting(trial.parameters["method"])
        setting = setting_name(method, global_ranking, round(trial.parameters["sparsity"], 4))
        if stage is not None:
            setting += f" (stage {stage + 1} of {len(stages)})"
    else:
        setting = "(setting known at its first epoch)"
    line = f"trial {trial.id} {setting}: "
    if trial.succeeded and stage is not None:
        final = trial.final
        return line + (f"finished: {final['accuracy']:.1%} on {SELECTION_SPLIT} after "
                       f"{final['epochs']} epochs, {describe_difference(final['vs_dense'])} "
                       "from the dense model")
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
    if trial.status in nni_engine.FINISHED:
        return line + trial.status.lower().replace("_", " ")
    if trial.epochs:
        return line + f"epoch {len(trial.epochs)}/{epochs} val {trial.epochs[-1]:.1%}"
    return line + trial.status.lower()


def finished(trials: Sequence[nni_engine.Trial]) -> list[nni_engine.Trial]:
    """The trials that finished, each result checked against the parameters NNI gave it."""
    for trial in trials:
        final = trial.final
        if trial.succeeded and (final["trial"] != trial.id
                                or final["parameters"] != trial.parameters):
            raise CheckFailed(f"trial {trial.id}: its result (trial {final['trial']}, "
                              f"{final['parameters']}) is not of the parameters the tuner "
                              f"gave it ({trial.parameters})")
    return [trial for trial in trials if trial.succeeded]


def reported_rows(trials: Sequence[nni_engine.Trial], training: dict) -> list[SweepRow]:
    """sweep.json's rows of the trials that finished: the setting and numbers each trial
    reported."""
    rows = []
    for trial in finished(trials):
        final = trial.final
        rows.append({"name": f"{final['name']} [{trial.id}]", "engine": "nni",
                     "trial": trial.id, "method": final["method"], "global": final["global"],
                     "sparsity": final["sparsity"], "path": final["path"],
                     "accuracy": final["accuracy"], "params": final["params"],
                     "training": training, "reported": final,
                     "minutes": round((trial.end - trial.start) / 60000, 2)})
    return rows


def experiment_settings(setup: SweepSetup, plan: ExperimentPlan,
                        output_dir: str) -> tuple[dict, dict]:
    """(search space, settings) of the experiment `plan` would run, after refusing what it
    cannot run; the settings are what experiment.json records to resume by (with successive
    halving, its stages: the space then only names the settings, for NNI's portal)."""
    if len(setup.stages) > 1:
        names = [setting_name(*method_setting(entry["method"]), entry["sparsity"])
                 for entry in halving_settings(plan.methods, plan.sparsities)]
        space = {"setting": {"_type": "choice", "_value": names}}
    else:
        space = search_space(plan.methods, plan.sparsities)
    if plan.nni_config and not os.path.isfile(plan.nni_config):
        raise UserError(f"--nni-config {plan.nni_config}: no such file")
    report = os.path.join(output_dir, "sweep.json")
    if os.path.isfile(report):
        read_report(report, "nni")
    try:
        os.makedirs(os.path.join(output_dir, "nni"), exist_ok=True)
    except OSError as error:
        raise UserError(f"--output-dir {output_dir}: cannot write there "
                        f"({error.strerror})") from None
    settings = {"training": setup.training_settings(), "search_space": space,
                "max_drop": plan.max_drop, "trials": plan.trials,
                "concurrency": plan.concurrency,
                "nni_config": plan.nni_config and os.path.abspath(plan.nni_config)}
    if len(setup.stages) > 1:  # (--trials is not used: the halving's count is)
        settings["stages"] = list(setup.stages)
        del settings["trials"]
    return space, settings


def read_state(state_path: str, settings: dict, output_dir: str) -> dict:
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
    recorded = dict(state["settings"])
    if isinstance(recorded.get("training"), dict):  # (as an older version recorded it)
        recorded["training"] = comparable_training(recorded["training"])
    if recorded != settings:
        changed = [key for key in settings if recorded.get(key) != settings[key]]
        raise UserError(f"{output_dir}: holds the NNI experiment {state['id']} of other "
                        f"settings ({', '.join(changed)}); give another --output-dir")
    return state


def summarise_experiment(trials: Sequence[nni_engine.Trial], experiment_id: str, settings: dict,
              epochs: int) -> dict:
    """experiment.json's record of the ended experiment: every trial, and the assessor's
    savings; its summary printed as one line."""
    stopped, saved = nni_engine.assessor_savings(trials, epochs)
    finished, failed = sum(t.succeeded for t in trials), sum(t.failed for t in trials)
    assessed = ("" if "stages" in settings else f"{stopped} stopped early by the assessor "
                f"(~{saved / 60:.1f} min of distillation saved), ")
    summary = f"{len(trials)} trials: {finished} finished, {assessed}{failed} failed"
    print(summary, flush=True)
    return {"id": experiment_id, "settings": settings, "summary": summary,
            "assessor_stopped": stopped, "assessor_saved_seconds": round(saved, 1),
            "trials": [dataclasses.asdict(t) for t in trials]}


def collect(setup: SweepSetup, trials: Sequence[nni_engine.Trial], record: dict, output_dir: str,
            max_drop: float) -> None:
    """The finished trials' students and the dense model measured together into sweep.json
    and sweep.png, as the plain sweep does; the pick copied to OUTPUT_DIR/SETTING.pth, its
    path in record["picked_copy"] in place of an earlier run's pick (that copy removed)."""
    earlier_copy = record.get("picked_copy")
    training, stages = record["settings"]["training"], record["settings"].get("stages")
    done = (experiment_rows(trials, finished(trials), training, stages) if stages
            else reported_rows(trials, training))
    if not done:
        raise CheckFailed(f"no trial of the experiment {record['id']} finished; see "
                          f"{os.path.join(output_dir, 'experiment.json')}")
    copies = {row["name"]: os.path.join(output_dir, f"{row['reported']['name']}.pth")
              for row in done}
    earlier = with_onnx(earlier_copy) if earlier_copy else []
    for copy in copies.values():  # refused now, not after the measurement
        for path in with_onnx(copy):
            if os.path.exists(path) and path not in earlier:
                raise UserError(f"{path}: exists, and the picked trial's student may be copied "
                                "there; move it first")
    for path in earlier:  # removed below: unless someone has put a file of theirs there
        if os.path.exists(path) and not written_here(path):
            raise UserError(f"{path}: the earlier pick was copied there, but it now holds a "
                            "file this pipeline did not write; move it first")
    if stages and setup.target != "pytorch":  # (halving's trials do not ship their students)
        for row in done:
            setup.ship_student(row["path"])
    rows, dense = measure_candidates(setup, done, os.path.join(output_dir, "compare.json"),
                                     output_dir)
    chosen = present(rows, dense, max_drop, output_dir)
    save_rows(rows, dense, os.path.join(output_dir, "sweep.json"))
    for path in earlier:
        if os.path.exists(path):
            os.remove(path)
    record.pop("picked_copy", None)
    if chosen:
        record["picked_copy"] = copies[chosen["name"]]
        copy_pick(setup, chosen["path"], record["picked_copy"])
        which = "picked" if chosen.get("picked") else "shipped (over the budget)"
        print(f"Copied the {which} trial's student to {record['picked_copy']}, ready to ship "
              "(.onnx and .int8.onnx beside it)")


def written_here(path: str) -> bool:
    """Whether the file at `path` is a checkpoint (.pth) or an exported file (.onnx) of this
    pipeline."""
    return written_by_export(path) if path.endswith(".onnx") else is_checkpoint_file(path)


def with_onnx(path: str) -> list[str]:
    """A checkpoint's path and its .onnx files' (targets.onnx_paths)."""
    return [path, *onnx_paths(path).values()]


def copy_pick(setup: SweepSetup, student: str, copy: str) -> None:
    """The picked trial's student copied to `copy`, its .onnx files beside it (copied as
    the trial shipped them, or made now)."""
    for source, destination in zip(with_onnx(student), with_onnx(copy)):
        if os.path.isfile(source):
            with open(source, "rb") as file:
                atomic_write(destination, lambda out: shutil.copyfileobj(file, out))
    if not all(os.path.isfile(path) for path in with_onnx(copy)):
        setup.ship_student(copy)


def run_experiment(setup: SweepSetup, plan: ExperimentPlan, output_dir: str,
                   trial_command_for: Callable[[int], str], code_directory: str) -> None:
    """The search as an NNI experiment: start or resume it, follow its trials, then measure
    the finished students together and pick, as the plain sweep does. A tuner that stops
    answering stops the experiment: the finished trials are measured and picked from, then
    CheckFailed says so.

    `trial_command_for(concurrency)` is the command NNI runs for each trial (sweep.py
    --nni-trial with its flags), in `code_directory`.
    """
    space, settings = experiment_settings(setup, plan, output_dir)
    state_path = os.path.join(output_dir, "experiment.json")
    state = read_state(state_path, settings, output_dir)
    experiment_id = state.get("id") or nni_engine.new_id()
    epochs, stages = setup.recipe.epochs, list(setup.stages)
    settings_run = halving_settings(plan.methods, plan.sparsities)
    halving = {"settings": settings_run, "stages": stages,
               "max_drop": plan.max_drop} if len(stages) > 1 else None
    with quiet_nni(setup.verbose):
        config = nni_config.make_config(
            plan.nni_config, trial_command_for, code_directory, space,
            most_trials(len(settings_run), len(stages)) if halving else plan.trials,
            plan.concurrency, assessor_start=max(1, epochs // 2), seed=setup.recipe.seed,
            working_directory=os.path.abspath(os.path.join(output_dir, "nni")),
            halving=halving)
    nni_config.check_port(plan.host, plan.port)  # (before the dense model is exported)
    setup.ship_dense(output_dir)  # before the trials, which time their students against it
    run = nni_engine.NniExperiment(config, experiment_id, plan.host, plan.port, setup.verbose)
    total = config.max_trial_number
    stopped = None
    try:
        how = run.start()
        write_json({"id": experiment_id, "settings": settings, **{
            key: state[key] for key in ("picked_copy",) if key in state}}, state_path)
        searched = (f"successive halving of {len(settings_run)} settings "
                    f"({', '.join(space['setting']['_value'])}): {epochs_of(epochs)} of "
                    "distillation each, then " + " and ".join(map(str, stages[1:]))
                    + f" more for half of those before, at most {total} trials" if halving else
                    f"{total} trials of {' / '.join(space['method']['_value'])} at sparsity "
                    f"{min(plan.sparsities):g}..{max(plan.sparsities):g}, {epochs} "
                    "distillation epochs each")
        print(f"NNI experiment {experiment_id} {how}: {searched}, {config.trial_concurrency} "
              f"at a time\nWeb portal: "
              f"http://{plan.host}:{plan.port}  (trials' files: "
              f"{os.path.join(output_dir, 'trials')}/)", flush=True)
        with tqdm(total=total, desc="trials finished", unit="trial") as bar, \
                processes.interrupting_signals():
            try:
                for trial in run.follow():
                    bar.write(describe_trial(trial, stages))
                    bar.n = sum(t.status in nni_engine.FINISHED for t in run.latest)
                    bar.refresh()
            except nni_engine.TunerStopped as error:  # the finished trials are still measured
                stopped = error
                bar.write(f"{error}: stopping it")
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
            folder = os.path.join(output_dir, "trials", trial.id)
            for leftover in glob.glob(os.path.join(folder, "*.state.pth")):
                os.remove(leftover)
    record = summarise_experiment(trials, experiment_id, settings, epochs)
    if "picked_copy" in state:  # an earlier run's pick: kept until collect() replaces it
        record["picked_copy"] = state["picked_copy"]
    write_json(record, state_path)
    if stopped and not any(trial.succeeded for trial in trials):
        raise stopped
    collect(setup, trials, record, output_dir, plan.max_drop)
    write_json(record, state_path)
    print(f"Saved {os.path.join(output_dir, 'sweep.json')}, "
          f"{os.path.join(output_dir, 'sweep.png')} and {state_path}")
    if stopped:
        finished = sum(trial.succeeded for trial in trials)
        raise CheckFailed(f"{stopped}; stopped it after {len(trials)} of {total} trials, and "
                          f"measured the {finished} finished "
                          f"({os.path.join(output_dir, 'sweep.json')})")
