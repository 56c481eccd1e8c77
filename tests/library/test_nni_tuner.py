"""Specification of the tuner sweep.py --engine nni gives NNI (nni_engine.make_config).

NNI 3.0's TPE, as NNI runs it: parameters asked one trial at a time (--concurrency 1),
each trial's result received before the next is asked. Unmended, its second trial dies
under numpy 2 (the experiment then waited for ever); with the startup the sweep sets, any
number of trials runs to the end. (The real experiments: tests/end_to_end/test_experiment.py.)
"""
import pytest

from compress.cli import UserError
from compress.sweep import experiment, nni_config

SPACE = experiment.search_space([("l1", False), ("taylor", False)], [0.5, 0.8])


def tuner_of(config):
    from nni.algorithms.hpo.tpe_tuner import TpeTuner

    tuner = TpeTuner(**config.tuner.class_args)
    tuner.update_search_space(SPACE)
    return tuner


def run_one_at_a_time(tuner, trials):
    """Ask, then answer, `trials` times, as NNI does at --concurrency 1; the settings given."""
    given = []
    for number in range(trials):
        parameters = tuner.generate_parameters(number)
        tuner.receive_trial_result(number, parameters, float(number % 3))
        given.append(parameters)
    return given


def config_for(trials, concurrency=1, tmp_path="."):
    return nni_config.make_config(None, lambda c: "python3 sweep.py", ".", SPACE, trials=trials,
                                  concurrency=concurrency, assessor_start=1, seed=0,
                                  working_directory=str(tmp_path))


@pytest.mark.parametrize("trials", [2, 3, 5, 8])
def test_the_sweeps_tpe_gives_a_setting_for_every_trial_one_at_a_time(trials, tmp_path):
    config = config_for(trials, tmp_path=tmp_path)
    assert config.tuner.class_args["tpe_args"]["n_startup_jobs"] >= nni_config.MIN_STARTUP_JOBS
    given = run_one_at_a_time(tuner_of(config), trials)
    assert len(given) == trials
    assert all(p["method"] in ("l1", "taylor") and 0.5 <= p["sparsity"] <= 0.8 for p in given)


def test_unmended_tpe_dies_on_its_second_setting_under_numpy_2(tmp_path):
    """The cause, kept as a check: if NNI or numpy change, this says the mend may go."""
    config = config_for(2, tmp_path=tmp_path)
    config.tuner.class_args["tpe_args"]["n_startup_jobs"] = 1  # what --trials 2/3 had
    with pytest.raises(TypeError, match="Cannot cast array data"):
        run_one_at_a_time(tuner_of(config), 2)


@pytest.mark.parametrize("startup", [0, 1])
def test_a_users_tpe_that_would_die_is_refused_in_one_line(startup, tmp_path):
    (tmp_path / "config.yml").write_text(
        "trainingService:\n  platform: local\ntuner:\n  name: TPE\n  classArgs:\n"
        f"    optimize_mode: maximize\n    tpe_args:\n      n_startup_jobs: {startup}\n")
    with pytest.raises(UserError, match=f"n_startup_jobs {startup}: NNI 3.0's TPE fails"):
        nni_config.make_config(str(tmp_path / "config.yml"), lambda c: "python3 sweep.py", ".",
                               SPACE, trials=3, concurrency=1, assessor_start=1, seed=0,
                               working_directory=str(tmp_path / "nni"))
