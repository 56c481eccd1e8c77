"""One trial of sweep.py --engine nni, as NNI runs it (`sweep.py --nni-trial`).

The setting NNI's tuner proposes is pruned and distilled in OUTPUT_DIR/trials/TRIAL_ID/
(setting.prune_and_distil), each epoch's validation accuracy but the last reported to
the assessor, then the student is shipped (unless the target is PyTorch) and timed
beside the dense model in the target runtime, and the trial's final result reported:
the objective (experiment.objective) and every figure the launcher needs, the
parameters it ran among them.

Under successive halving (nni_halving.py: the parameters name a stage), a trial distils
its setting for that stage's epochs -- stage 1 pruned and distilled as above, a later
stage continuing the student of the trial named in its parameters, copied into its own
folder (halving.continue_setting) -- and reports its standing (halving.standing(): the
paired difference from the dense model on val, in PyTorch, and the multiply-adds) for the
advisor to decide by; nothing is exported or timed: the students the halving leaves are
measured together when the experiment ends.
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch

from compress.checkpoints import load_checkpoint, model_from_checkpoint, output_path
from compress.cli import Interrupted, UserError
from compress.sweep import halving
from compress.sweep.candidates import SweepSetup, measure_candidates
from compress.sweep.decision import SELECTION_SPLIT
from compress.sweep.experiment import objective
from compress.sweep.setting import Setting, method_setting, prune_and_distil
from compress.sweep.report import reference_accuracy
from compress.sweep.rules import within_budget
from model import count_parameters


def check_run_by_nni() -> None:
    """UserError unless NNI started this process as one of its trials."""
    if "NNI_TRIAL_JOB_ID" not in os.environ:  # (set by NNI for each trial it runs)
        raise UserError("--nni-trial: run by NNI's experiment (sweep.py --engine nni), not "
                        "by hand")


def run_trial(setup: SweepSetup, output_dir: str, max_drop: float, concurrency: int) -> None:
    """Run the trial NNI started this process for (UserError outside NNI); each trial takes
    the cores / `concurrency` threads."""
    check_run_by_nni()
    import nni

    parameters = nni.get_next_parameter()
    trial = nni.get_trial_id()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // concurrency))
    method, global_ranking = method_setting(parameters["method"])
    setting = Setting(method, global_ranking, round(float(parameters["sparsity"]), 4))
    folder = os.path.join(output_dir, "trials", trial)
    os.makedirs(folder, exist_ok=True)
    student = os.path.join(folder, f"{setting.name}.pth")
    if "stage" in parameters:
        with stopped_as_nni_means():
            try:
                return run_stage(setup, output_dir, parameters, setting, student)
            except Exception:  # (the advisor learns it, also after a resume; then it raises)
                nni.report_final_result({"default": None, "failed": True, "trial": trial,
                                         "parameters": parameters})
                raise
    epochs = setup.recipe.epochs

    def report_epoch(record):
        # not the last: the assessor would judge a trial that has distilled every epoch,
        # and stopping it then saves nothing and loses its result
        if record["epoch"] < epochs:
            nni.report_intermediate_result(record["val_accuracy"])

    with stopped_as_nni_means():
        history = prune_and_distil(setup, student, setting, on_epoch=report_epoch)
        if setup.target != "pytorch":  # measured as it would ship
            setup.ship_student(student)
        (row,), dense = measure_candidates(setup, [{"name": setting.name, "path": student}],
                                os.path.join(folder, "compare.json"), output_dir)
    speedup = dense["latency_ms"] / row["latency_ms"]
    # decided on val: the tuner must never see the test split
    accuracy = row["by_split"][SELECTION_SPLIT]["accuracy"]
    reference = reference_accuracy(dense, SELECTION_SPLIT)
    nni.report_final_result({
        "default": objective(accuracy, reference, speedup, max_drop),
        "trial": trial, "parameters": parameters, "name": setting.name, "method": method,
        "global": global_ranking, "sparsity": setting.sparsity, "path": student,
        "target": setup.target, "accuracy": accuracy, "dense_accuracy": reference,
        "within_budget": within_budget(accuracy, reference, max_drop),
        "speedup": speedup, "latency_ms": row["latency_ms"],
        "dense_latency_ms": dense["latency_ms"], "params": row["params"],
        "flops": row["flops"], "file_bytes": row["file_bytes"],
        "epochs": [record["val_accuracy"] for record in history]})


@contextlib.contextmanager
def stopped_as_nni_means() -> Iterator[None]:
    """A trial stopped by SIGINT (NNI's assessor, or the experiment stopping; a
    distillation saves its state first) ends by that signal: that tells NNI the trial was
    stopped, not that it failed."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def run_stage(setup: SweepSetup, output_dir: str, parameters: dict, setting: Setting,
              student: str) -> None:
    """A trial of successive halving: `setting` distilled for its stage's epochs into
    `student` (in the trial's folder), its standing reported (see the module's doc)."""
    import nni

    stage, stages = parameters["stage"], list(setup.stages)

    def report_epoch(record):  # (for the portal: the advisor decides after the stage)
        nni.report_intermediate_result(record["val_accuracy"])

    if stage == 0:
        prune_and_distil(setup, student, setting, on_epoch=report_epoch)
    else:
        started = output_path(student, f"stage{stage}.pth")  # (by this trial, run again)
        if not (os.path.isfile(student) or os.path.isfile(started)):
            halving.copy_student(os.path.join(output_dir, "trials", parameters["continues"],
                                              os.path.basename(student)), student)
        halving.continue_setting(setup, student, stages, stage, on_epoch=report_epoch)
    standing = halving.standing(setup, student, halving.dense_hits(setup))
    checkpoint = load_checkpoint(student, kinds=("finetuned",))
    nni.report_final_result({
        "default": 100 * standing["vs_dense"]["difference"], "trial": nni.get_trial_id(),
        "parameters": parameters, "name": setting.name, "method": setting.method,
        "global": setting.global_ranking, "sparsity": setting.sparsity, "path": student,
        "stage": stage, "epochs": sum(stages[:stage + 1]), "accuracy": standing["val_accuracy"],
        "params": count_parameters(model_from_checkpoint(checkpoint, student)), **standing})
