"""Successive halving inside an NNI experiment: sweep.py --engine nni --kd-epochs 5 20.

NNI's own Hyperband draws its settings at random and continues the best third by one
number; this advisor (what NNI runs in place of a tuner and an assessor) runs the plain
sweep's halving instead, so that the two engines distil the same settings and decide
alike: stage 1 is one trial per setting (--methods x --sparsities, as listed), each
distilling for the first --kd-epochs; when every trial of a stage has ended,
rules.survivors() (as halving.py) picks the settings that continue, from the standings the trials
reported (the paired difference from the dense model on val, the multiply-adds), and
each continues as a new trial that starts from its last trial's student (its folder is in
the parameters) for the next stage's epochs. A setting whose trial failed stops there.

Its decisions are made from what NNI tells it, so a resumed experiment decides again the
same way: NNI's resume hands it the finished trials' results (ImportData) and starts the
running ones again (AddCustomizedTrialJob); a trial stopped with the experiment runs again.

- `SuccessiveHalving`: the advisor (NNI imports it by name: nni_config.ADVISOR).
- `stage_parameters()` / `setting_of()`: a trial's parameters, and back.
"""
from __future__ import annotations

import threading

import nni
from nni.runtime.msg_dispatcher_base import MsgDispatcherBase
from nni.runtime.tuner_command_channel import CommandType

from compress.sweep.rules import survivors

# a trial's parameter ID: stage * ID_STAGE + the setting's index (a setting runs once a
# stage; run again after a resume, it gets the same ID with the same parameters)
ID_STAGE = 10000


def stage_parameters(setting: dict, stage: int, continues: str | None) -> dict:
    """What the trial of `setting` ({"method", "sparsity"}) at `stage` (from 0) is given:
    `continues` is the trial ID whose student it continues (None at stage 0)."""
    return {"method": setting["method"], "sparsity": setting["sparsity"], "stage": stage,
            "continues": continues}


def setting_of(parameters: dict) -> tuple[str, float]:
    """The setting a trial's parameters are of: (method, sparsity)."""
    return parameters["method"], parameters["sparsity"]


class SuccessiveHalving(MsgDispatcherBase):
    """NNI's advisor for sweep.py's successive halving of `settings` ([{"method", "sparsity"},
    ...]) over `stages` (the epochs of each), continuing those that can still make
    `max_drop` (rules.survivors()). Each trial reports its standing as its final result
    ({"vs_dense", "flops", ...}: halving.standing())."""

    def __init__(self, settings: list[dict], stages: list[int], max_drop: float | None = None,
                 command_channel_url: str | None = None):
        super().__init__(command_channel_url)
        self.settings, self.stages, self.max_drop = settings, stages, max_drop
        self.keys = [setting_of(setting) for setting in settings]
        self.lock = threading.Lock()  # (NNI hands trial ends and results to two threads)
        self.credit = 0  # trials NNI asked for and has not been given
        self.queue = []  # parameters decided, not yet given
        self.issued = set()  # (stage, index) given to a trial (or started again by NNI)
        self.results = {}  # (stage, index) -> the final result its trial reported
        self.trials = {}  # (stage, index) -> the trial ID that reported it
        self.failed = set()  # (stage, index) whose trial ended without a result
        self.kept = {}  # stage -> the indices that run it, once decided (never decided again)
        self.finished = False

    # --- NNI's commands ------------------------------------------------------------------

    def handle_initialize(self, data: dict) -> None:
        """NNI's first command (the search space): answered at once."""
        self.send(CommandType.Initialized, "")

    def handle_update_search_space(self, data: dict) -> None:
        """Nothing to do: the settings are the advisor's own (the space only names them, for
        NNI's portal)."""

    def handle_import_data(self, data: list) -> None:
        """A resumed experiment's finished trials: their results, as if just reported."""
        with self.lock:
            for entry in data:
                parameters, value = entry.get("parameter"), decoded(entry.get("value"))
                if isinstance(parameters, dict) and "stage" in parameters and value:
                    key = self.key_of(parameters)
                    self.issued.add(key)
                    self.record(key, value, entry.get("trialJobId"))

    def handle_add_customized_trial(self, data: list) -> None:
        """A resumed experiment's running trials, which NNI starts again with their
        parameters: they are issued already, and a result one had reported before the stop
        is forgotten (it distils again, and the next stage must copy what it ends with)."""
        with self.lock:
            for entry in data if isinstance(data, list) else [data]:
                key = self.key_of(entry["parameters"])
                self.issued.add(key)
                self.results.pop(key, None)
                self.failed.discard(key)

    def handle_request_trial_jobs(self, data: int) -> None:
        """NNI asks for `data` more trials: given as the stages allow."""
        with self.lock:
            self.credit += data
            self.advance()

    def handle_report_metric_data(self, data: dict) -> None:
        """A trial's result: its final one is its standing (the epochs': for the portal)."""
        if data["type"] != "FINAL":
            return
        with self.lock:
            self.record(self.key_of_id(data["parameter_id"]), decoded(data["value"]),
                        data["trial_job_id"])
            self.advance()

    def handle_trial_end(self, data: dict) -> None:
        """A trial ended: without a result, its setting stops there."""
        with self.lock:
            key = self.key_of_id(decoded(data["hyper_params"])["parameter_id"])
            if data["event"] != "SUCCEEDED" and key not in self.results:
                self.failed.add(key)
            self.advance()

    # --- the halving -----------------------------------------------------------------------

    def record(self, key: tuple[int, int], value: dict, trial: str | None) -> None:
        """A trial's final result: its standing, or {"failed": ...} (run_stage reports that
        when its distillation raises, so that a resumed experiment knows it too)."""
        if value.get("failed"):
            self.failed.add(key)
        else:
            self.results[key] = value
            self.trials[key] = trial

    def key_of(self, parameters: dict) -> tuple[int, int]:
        """(stage, setting index) of a trial's parameters."""
        return parameters["stage"], self.keys.index(setting_of(parameters))

    @staticmethod
    def key_of_id(parameter_id: int) -> tuple[int, int]:
        """(stage, setting index) of a parameter ID."""
        return int(parameter_id) // ID_STAGE, int(parameter_id) % ID_STAGE

    def stage_settings(self, stage: int) -> list[int] | None:
        """The indices of the settings that run `stage`; None while the stage before runs."""
        if stage == 0:
            return list(range(len(self.settings)))
        if stage in self.kept:
            return self.kept[stage]
        before = self.stage_settings(stage - 1)
        if before is None or not all(self.ended((stage - 1, index)) for index in before):
            return None
        standings = {index: self.results[stage - 1, index] for index in before
                     if (stage - 1, index) in self.results}
        self.kept[stage] = sorted(survivors(standings, self.max_drop))
        return self.kept[stage]

    def ended(self, key: tuple[int, int]) -> bool:
        """Whether the trial of `key` (stage, setting index) has ended, its result known."""
        return key in self.results or key in self.failed

    def advance(self) -> None:
        """Queue the trials that can start now, give NNI those it asked for, and say when
        there are no more."""
        for stage in range(len(self.stages)):
            indices = self.stage_settings(stage)
            if indices is None:
                break
            for index in indices:
                if (stage, index) not in self.issued:
                    self.issued.add((stage, index))
                    continues = self.trials.get((stage - 1, index)) if stage else None
                    self.queue.append({"parameter_id": stage * ID_STAGE + index,
                                       "parameter_source": "algorithm", "parameter_index": 0,
                                       "parameters": stage_parameters(self.settings[index],
                                                                      stage, continues)})
            self.finished = (stage == len(self.stages) - 1
                             and all(self.ended((stage, index)) for index in indices))
        while self.credit and self.queue:
            self.send(CommandType.NewTrialJob, nni.dump(self.queue.pop(0)))
            self.credit -= 1
        if self.finished and self.credit:
            self.send(CommandType.NoMoreTrialJobs, nni.dump({"parameter_id": None,
                                                             "parameter_source": "algorithm",
                                                             "parameters": ""}))
            self.credit = 0


def decoded(value: object) -> dict:
    """A final result as NNI hands it on (JSON text, once or twice encoded), as a dict."""
    while isinstance(value, str):
        value = nni.load(value)
    return value if isinstance(value, dict) else {}
