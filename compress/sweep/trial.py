"""One trial of sweep.py --engine nni, as NNI runs it (`sweep.py --nni-trial`).

The setting NNI's tuner proposes is pruned and distilled in OUTPUT_DIR/trials/TRIAL_ID/
(setting.prune_and_distil), each epoch's validation accuracy but the last reported to
the assessor, then the student is shipped (unless the target is PyTorch) and timed
beside the dense model in the target runtime, and the trial's final result reported:
the objective (experiment.objective) and every figure the launcher needs, the
parameters it ran among them.
"""
from __future__ import annotations

import os
import signal

import torch

from compress.cli import Interrupted, UserError
from compress.sweep.candidates import SweepSetup, measure_candidates
from compress.sweep.decision import SELECTION_SPLIT, within_budget
from compress.sweep.experiment import objective
from compress.sweep.setting import Setting, method_setting, prune_and_distil
from compress.sweep.report import reference_accuracy


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
    epochs = setup.recipe.epochs

    def report_epoch(record):
        # not the last: the assessor would judge a trial that has distilled every epoch,
        # and stopping it then saves nothing and loses its result
        if record["epoch"] < epochs:
            nni.report_intermediate_result(record["val_accuracy"])

    try:
        history = prune_and_distil(setup, student, setting, on_epoch=report_epoch)
        if setup.target != "pytorch":  # measured as it would ship
            setup.ship_student(student)
        (row,), dense = measure_candidates(setup, [{"name": setting.name, "path": student}],
                                os.path.join(folder, "compare.json"), output_dir)
    except (Interrupted, KeyboardInterrupt):
        # NNI's assessor stops a trial with SIGINT (a distillation saves its state first);
        # ending by that signal tells NNI the trial was stopped, not that it failed
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
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
