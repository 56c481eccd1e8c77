"""Specification of the advisor that runs successive halving inside an NNI experiment
(compress/sweep/nni_halving.py), driven here as NNI's manager drives it: it is asked for
trials, told each trial's result and end (on two threads, so an end may come before its
result), and, in a resumed experiment, handed the finished trials' results and the
running ones' parameters first. (The real experiment: tests/end_to_end/test_experiment.py.)
"""
import importlib

import nni
import pytest

from compress.cli import UserError
from compress.sweep import halving, nni_config, nni_halving, rules

SETTINGS = [{"method": "l1", "sparsity": s} for s in (0.5, 0.6, 0.7, 0.8)]
# after stage 1: the paired difference from the dense model and the multiply-adds of each
STANDINGS = {0.5: (-0.02, 400), 0.6: (-0.03, 300), 0.7: (-0.05, 200), 0.8: (-0.20, 100)}


class Manager:
    """NNI's manager as the advisor sees it: what it sends is kept in `sent`."""

    def __init__(self, stages=(1, 2), max_drop=None, settings=SETTINGS):
        self.advisor = nni_halving.SuccessiveHalving(settings, list(stages), max_drop,
                                                     command_channel_url="ws://_unittest_")
        self.sent = []
        self.trials = {}  # parameter ID -> the trial ID NNI gave it
        self.advisor.send = self.receive
        self.advisor.handle_initialize({})

    def receive(self, command, data):
        data = nni.load(data) if data else data
        self.sent.append((command.value, data))
        if command.value == "TR":  # NewTrialJob: NNI starts a trial with it
            self.trials[data["parameter_id"]] = f"T{len(self.trials)}"

    def ask(self, count):
        """Trials asked for: the parameters of those started."""
        before = len(self.sent)
        self.advisor.handle_request_trial_jobs(count)
        return [data for command, data in self.sent[before:] if command == "TR"]

    def no_more(self):
        return any(command == "NO" for command, _ in self.sent)

    def report(self, parameters, event="SUCCEEDED", result=True, end=True):
        """A trial's result (its standing; {"failed": True} for a FAILED one, as
        trial.run_stage reports when it raises) then its end."""
        trial = self.trials[parameters["parameter_id"]]
        sparsity = parameters["parameters"]["sparsity"]
        difference, flops = STANDINGS[sparsity]
        if result:
            value = {"vs_dense": {"difference": difference, "low": difference - 0.04,
                                  "high": difference + 0.04}, "flops": flops}
            if event == "FAILED":
                value = {"default": None, "failed": True}
            self.advisor.handle_report_metric_data({
                "parameter_id": parameters["parameter_id"], "trial_job_id": trial,
                "type": "FINAL", "sequence": 0, "value": nni.dump(value)})
        if end:
            self.end(parameters, event)

    def end(self, parameters, event="SUCCEEDED"):
        self.advisor.handle_trial_end({"trial_job_id": self.trials[parameters["parameter_id"]],
                                       "event": event, "hyper_params": nni.dump(parameters)})


def sparsities(given):
    return [p["parameters"]["sparsity"] for p in given]


def test_every_setting_runs_stage_one_then_the_survivors_continue_their_own_students():
    manager = Manager()
    first = manager.ask(2) + manager.ask(3)  # (more asked than there are: the rest waits)
    assert sparsities(first) == [0.5, 0.6, 0.7, 0.8]
    assert all(p["parameters"]["stage"] == 0 and p["parameters"]["continues"] is None
               for p in first)
    for parameters in first[:3]:
        manager.report(parameters)
    assert manager.ask(1) == []  # stage 2 waits for every trial of stage 1
    before = len(manager.sent)
    manager.report(first[3])
    second = manager.sent[before:]
    standings = {p["parameters"]["sparsity"]: {"vs_dense": {"difference": STANDINGS[s][0],
                                                            "low": 0, "high": 0},
                                               "flops": STANDINGS[s][1]}
                 for p in first for s in [p["parameters"]["sparsity"]]}
    kept = sorted(rules.survivors(standings, None))
    given = [data for command, data in second if command == "TR"]
    assert sorted(sparsities(given)) == kept == [0.5, 0.6]
    for parameters in given:  # each continues the trial that ran its setting in stage 1
        stage_one = next(p for p in first if p["parameters"]["sparsity"]
                         == parameters["parameters"]["sparsity"])
        assert parameters["parameters"]["stage"] == 1
        assert parameters["parameters"]["continues"] == manager.trials[stage_one["parameter_id"]]
    assert not manager.no_more()
    for parameters in given:
        manager.report(parameters)
    assert manager.ask(1) == [] and manager.no_more()


def test_the_budget_decides_which_continue_as_in_the_plain_sweep():
    manager = Manager(max_drop=4.0)  # 0.5, 0.6 and 0.7 can reach it: the cheapest continue
    first = manager.ask(4)
    for parameters in first:
        manager.report(parameters)
    given = manager.ask(4)
    assert sparsities(given) == [0.6, 0.7]  # (without a budget: the most accurate, 0.5 0.6)


def test_a_trials_end_before_its_result_waits_for_the_result():
    manager = Manager()
    first = manager.ask(4)
    for parameters in first[:3]:
        manager.report(parameters)
    manager.end(first[3])  # (the end, on the assessor's thread, before the result)
    assert manager.ask(2) == []
    before = len(manager.sent)
    manager.report(first[3], end=False)
    assert sparsities([d for c, d in manager.sent[before:] if c == "TR"]) == [0.5, 0.6]


@pytest.mark.parametrize("reported", [True, False], ids=["failure reported", "killed"])
def test_a_failed_trial_stops_its_setting_and_the_others_go_on(reported):
    manager = Manager()
    first = manager.ask(4)
    manager.report(first[0], event="FAILED", result=reported)
    for parameters in first[1:]:
        manager.report(parameters)
    given = manager.ask(4)
    assert sparsities(given) == [0.6, 0.7]  # of the three with a result, two (half, up)


def test_a_result_after_its_trials_failed_end_decides_nothing_again():
    """A trial that reported its standing, then ended FAILED (its end handled first): the
    stage was decided without it, and stays decided."""
    manager = Manager()
    first = manager.ask(4)
    for parameters in first[1:]:
        manager.report(parameters)
    manager.end(first[0], event="FAILED")
    manager.report(first[0], end=False)
    manager.ask(4)
    stage_two = [p for command, p in manager.sent if command == "TR"
                 and p["parameters"]["stage"] == 1]
    assert sparsities(stage_two) == [0.6, 0.7]


def test_a_resumed_experiment_decides_again_as_the_first_run_did():
    """Stopped while 0.8's stage-1 trial ran: NNI hands the resumed advisor the three
    finished results and starts 0.8's trial again with its parameters."""
    run = Manager()
    first = run.ask(4)
    for parameters in first[:3]:
        run.report(parameters)

    resumed = Manager()
    resumed.trials = dict(run.trials)
    resumed.advisor.handle_import_data([
        {"parameter": p["parameters"], "trialJobId": run.trials[p["parameter_id"]],
         "value": nni.dump({"vs_dense": {"difference": STANDINGS[s][0], "low": 0, "high": 0},
                            "flops": STANDINGS[s][1]})}  # (as NNI exports it: JSON text)
        for p in first[:3] for s in [p["parameters"]["sparsity"]]])
    resumed.advisor.handle_add_customized_trial([dict(first[3], parameter_source="resumed")])
    assert resumed.ask(4) == []  # nothing run again; stage 2 waits for 0.8
    resumed.report(first[3])
    given = [data for command, data in resumed.sent if command == "TR"]
    run.report(first[3])
    assert len(given) == 2 and given == run.ask(4)
    assert resumed.trials[given[0]["parameter_id"] - nni_halving.ID_STAGE] == \
        given[0]["parameters"]["continues"]


def test_a_resumed_experiment_runs_no_failed_trial_again_and_reruns_a_restarted_one():
    """NNI's resume hands back the results of finished trials (a failed one's {"failed"}
    among them) and starts those it found running again, even one that had reported."""
    run = Manager()
    first = run.ask(4)
    run.report(first[0], event="FAILED")
    run.report(first[1])
    run.report(first[2])
    run.report(first[3], end=False)  # reported, then the experiment stopped

    resumed = Manager()
    resumed.trials = dict(run.trials)
    resumed.advisor.handle_import_data([
        {"parameter": p["parameters"], "trialJobId": run.trials[p["parameter_id"]],
         "value": nni.dump(value)} for p in first
        for value in [{"failed": True} if p is first[0] else
                      {"vs_dense": {"difference": STANDINGS[p["parameters"]["sparsity"]][0],
                                    "low": 0, "high": 0},
                       "flops": STANDINGS[p["parameters"]["sparsity"]][1]}]])
    resumed.advisor.handle_add_customized_trial([dict(first[3], parameter_source="resumed")])
    assert resumed.ask(4) == []  # 0.5 is not run again; 0.8 runs again, stage 2 waits
    resumed.report(first[3])
    given = [data for command, data in resumed.sent if command == "TR"]
    assert sparsities(given) == [0.6, 0.7]


def test_three_stages_halve_twice_and_the_trials_are_counted():
    manager = Manager(stages=(1, 1, 1))
    for stage in range(3):
        manager.ask(4)
        for command, parameters in list(manager.sent):
            if command == "TR" and parameters["parameters"]["stage"] == stage:
                manager.report(parameters)
    manager.ask(1)
    stages = [p["parameters"]["stage"] for command, p in manager.sent if command == "TR"]
    assert stages == [0, 0, 0, 0, 1, 1, 2] and manager.no_more()
    assert halving.most_trials(4, 3) == 7 and halving.most_trials(3, 2) == 5


def test_nni_config_runs_the_advisor_by_its_name_in_place_of_tuner_and_assessor(tmp_path):
    module, name = nni_config.ADVISOR.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is nni_halving.SuccessiveHalving
    halving_args = {"settings": SETTINGS, "stages": [1, 2], "max_drop": 1.0}
    config = nni_config.make_config(None, lambda c: "python3 sweep.py", ".", {}, trials=7,
                                    concurrency=2, assessor_start=1, seed=0,
                                    working_directory=str(tmp_path), halving=halving_args)
    assert config.tuner.class_name == nni_config.ADVISOR
    assert config.tuner.class_args == halving_args and config.assessor is None
    assert config.max_trial_number == 7
    for line, named in (("assessor:\n  name: Medianstop\n", "assessor"),
                        ("maxTrialNumber: 16\n", "maxTrialNumber")):
        (tmp_path / "own.yml").write_text("trainingService:\n  platform: local\n" + line)
        with pytest.raises(UserError, match=f"own.yml: sets {named}, which successive halving"):
            nni_config.make_config(str(tmp_path / "own.yml"), lambda c: "python3 sweep.py",
                                   ".", {}, trials=7, concurrency=2, assessor_start=1, seed=0,
                                   working_directory=str(tmp_path), halving=halving_args)
