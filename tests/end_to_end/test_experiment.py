"""Specification of sweep.py --engine nni (experiment.py): the search as an NNI experiment.

- A tiny experiment (conftest's narrow_teacher, an untrained narrow VGG; 2 distillation
  epochs, 3 trials one at a time: unmended, NNI 3.0's TPE died after the first of them)
  runs to the end through the command line: sweep.json holds the dense row and one row
  per finished trial, each equal to what that trial reported to NNI (its
  parameters included), its student in OUTPUT_DIR/trials/ID/, the picked one copied.
- Run again, it resumes the finished experiment (NNI's resume) and trains nothing.
- With several --kd-epochs, successive halving: three sparsities, the settings the plain
  sweep's rule keeps continued as new trials from their first trial's students; run
  again, it distils nothing. (The advisor's decisions, resume and failures:
  tests/library/test_nni_halving.py.)
- (Ctrl-C, a crashing trial, a tuner that fails or runs out of settings:
  test_experiment_failures.py.)
- Bad values (no budget, one-point search space, port taken, a YAML setting what
  sweep.py sets) are one-line errors, with nothing left running (run through sweep.py's
  CLI edge in this process; the taken port through a process of its own).

NNI's manifest of experiments lives in ~/nni-experiments: each run gets its own HOME.
"""
import json
import os
import socket
import sqlite3
import types
from pathlib import Path

import pytest

from compress.cli import CheckFailed, UserError
from compress.sweep import experiment, nni_config, nni_engine, plain, rules, setting
from helpers import (NNI_TINY, assert_clean_error, free_port, load_script, local_config,
                     nni_env, port_is_free, processes_of, run_in_process, run_script,
                     small_checkpoint)

pytestmark = pytest.mark.slow  # (every test starts sweep.py, most of them NNI's manager)

sweep = load_script("sweep")
TINY = NNI_TINY
# the module's experiment: 3 trials one at a time (run again by the resume tests)
EXPERIMENT = [*TINY, "--trials", 3, "--concurrency", 1]


def final_metrics(folder):
    """{trial ID: [final result, ...]} as NNI's database holds them."""
    experiment_id = json.loads((folder / "experiment.json").read_text())["id"]
    database = folder / "nni" / experiment_id / "db" / "nni.sqlite"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT trialJobId, type, data FROM MetricData").fetchall()
    results = {}
    for trial, kind, data in rows:
        value = json.loads(data)
        value = json.loads(value) if isinstance(value, str) else value
        results.setdefault((trial, kind), []).append(value)
    return results


def job_parameters(folder):
    """{trial ID: the parameters NNI's records (and its portal) say the trial ran}."""
    experiment_id = json.loads((folder / "experiment.json").read_text())["id"]
    database = folder / "nni" / experiment_id / "db" / "nni.sqlite"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT trialJobId, data FROM TrialJobEvent "
                                  "WHERE event = 'RUNNING'").fetchall()
    return {trial: json.loads(data)["parameters"] for trial, data in rows}


@pytest.fixture(scope="module")
def experimented(narrow_teacher, tmp_path_factory):
    """A finished tiny experiment in a folder holding the narrow teacher's dataset and model."""
    folder = tmp_path_factory.mktemp("nni")
    os.symlink(narrow_teacher / "dataset", folder / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", folder / "vgg16Net.pth")
    port = free_port()
    proc = run_script("sweep.py", *EXPERIMENT, "--port", port,
                      "--nni-config", local_config(folder), cwd=folder,
                      env=nni_env(folder / "home"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "3 trials: 3 finished" in proc.stdout
    return types.SimpleNamespace(folder=folder, out=folder / "sweep", port=port, proc=proc,
                                 rows=json.loads((folder / "sweep" / "sweep.json").read_text()))


def test_tiny_experiment_writes_a_row_per_finished_trial_as_the_trial_reported(experimented):
    out, rows = experimented.out, experimented.rows
    dense, trials = rows[0], rows[1:]
    assert dense["name"] == "dense" and len(trials) == 3
    reported = final_metrics(out)
    for row in trials:
        final, = reported[(row["trial"], "FINAL")]
        assert row["reported"] == final  # the whole result, parameters included
        assert row["engine"] == "nni"
        assert (row["method"], row["global"], row["sparsity"]) == \
            (final["method"], final["global"], final["sparsity"])
        assert final["parameters"] == {"method": "l1", "sparsity": pytest.approx(row["sparsity"])}
        # NNI's own records pair the trial with the parameters it ran (see MANAGER_PRELOAD)
        assert job_parameters(out)[row["trial"]] == final["parameters"]
        assert 0.5 <= row["sparsity"] <= 0.8
        assert row["name"] == f"{final['name']} [{row['trial']}]"
        assert final["name"] == setting.setting_name("l1", False, row["sparsity"])
        # the student in the trial's own folder is the one of that sparsity
        assert Path(row["path"]).parent == out.resolve() / "trials" / row["trial"]
        import torch
        student = torch.load(row["path"], weights_only=True, map_location="cpu")
        assert student["metrics"]["student_metrics"]["sparsity"] == row["sparsity"]
        # measured again beside the others: the same checkpoint, the same accuracy and size
        assert row["accuracy"] == final["accuracy"] and row["params"] == final["params"]
        # each epoch's validation accuracy but the last went to the assessor (stopping a
        # trial after its last epoch saves nothing); the result holds them all
        epochs = [value for value in reported[(row["trial"], "PERIODICAL")]]
        assert epochs == final["epochs"][:-1] and len(final["epochs"]) == 2
        assert final["default"] == experiment.objective(final["accuracy"], final["dense_accuracy"],
                                                   final["speedup"], 100)


def test_tiny_experiment_picks_and_copies_the_fastest_within_budget(experimented):
    out, rows = experimented.out, experimented.rows
    picked = [row for row in rows[1:] if row["picked"]]
    assert len(picked) == 1
    assert picked[0]["latency_ms"] == min(row["latency_ms"] for row in rows[1:])
    copy = out / f"{picked[0]['reported']['name']}.pth"
    assert copy.read_bytes() == Path(picked[0]["path"]).read_bytes()
    assert (out / "sweep.png").stat().st_size > 0
    state = json.loads((out / "experiment.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["SUCCEEDED"] * 3
    assert "3 trials: 3 finished" in experimented.proc.stdout
    assert "Web portal: http://127.0.0.1:" in experimented.proc.stdout


def test_finished_experiment_leaves_no_process_and_frees_its_port(experimented):
    assert processes_of(experimented.out) == []
    assert port_is_free(experimented.port)


def test_same_command_again_resumes_and_trains_nothing(experimented):
    folder, out = experimented.folder, experimented.out
    students = {row["path"]: os.stat(row["path"]).st_mtime_ns for row in experimented.rows[1:]}
    proc = run_script("sweep.py", *EXPERIMENT, "--port", experimented.port,
                      "--nni-config", folder / "local.yml", cwd=folder,
                      env=nni_env(folder / "home"))
    assert proc.returncode == 0, proc.stderr
    assert " resumed:" in proc.stdout
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted(r["trial"] for r in rows[1:]) == sorted(r["trial"] for r in experimented.rows[1:])
    assert {path: os.stat(path).st_mtime_ns for path in students} == students
    assert processes_of(out) == []


def test_a_resume_refused_before_its_pick_keeps_the_earlier_pick(experimented):
    """A run that stops before picking (here: a file where another trial's student would be
    copied) keeps the record of the earlier run's copy, so the next run replaces it instead
    of refusing it as someone else's file."""
    folder, out = experimented.folder, experimented.out
    command = ["sweep.py", *EXPERIMENT, "--port", experimented.port,
               "--nni-config", folder / "local.yml"]
    # (as the run before this one left them: one that resumed re-timed, and may have picked
    # another trial)
    rows = json.loads((out / "sweep.json").read_text())[1:]
    picked, = [row for row in rows if row["picked"]]
    other = next(row for row in rows if not row["picked"])
    blocker = out / f"{other['reported']['name']}.pth"
    blocker.write_text("the user's own file")
    try:
        refused = run_script(*command, cwd=folder, env=nni_env(folder / "home"))
    finally:
        kept = blocker.read_text()
        blocker.unlink()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert blocker.name in refused.stderr.strip().splitlines()[-1]  # (after the trials' bar)
    assert kept == "the user's own file"
    again = run_script(*command, cwd=folder, env=nni_env(folder / "home"))
    assert again.returncode == 0, again.stderr
    rows = json.loads((out / "sweep.json").read_text())
    now, = [row for row in rows[1:] if row["picked"]]
    copy = out / f"{now['reported']['name']}.pth"
    assert copy.read_bytes() == Path(now["path"]).read_bytes()
    recorded = json.loads((out / "experiment.json").read_text())["picked_copy"]
    assert (folder / recorded).resolve() == copy.resolve()
    if now["name"] != picked["name"]:  # timed again: another may be the fastest now
        assert not (out / f"{picked['reported']['name']}.pth").exists()


def test_the_earlier_picks_copy_replaced_by_a_file_of_the_users_is_refused_not_removed(
        experimented):
    folder, out = experimented.folder, experimented.out
    copy = folder / json.loads((out / "experiment.json").read_text())["picked_copy"]
    saved = copy.read_bytes()
    copy.write_text("the user's own file, where the pick's copy was")
    try:
        refused = run_script("sweep.py", *EXPERIMENT, "--port", experimented.port,
                             "--nni-config", folder / "local.yml", cwd=folder,
                             env=nni_env(folder / "home"))
        kept = copy.read_text()
    finally:
        copy.write_bytes(saved)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert copy.name in last and "did not write" in last
    assert kept == "the user's own file, where the pick's copy was"


# --- successive halving as an NNI experiment (several --kd-epochs) ---

HALVING = ["--engine", "nni", "--kd-epochs", 1, 1, "--sparsities", 0.5, 0.8, 0.9,
           "--concurrency", 2, "--batch-size", 8, "--workers", 0, "--repeats", 2,
           "--max-repeats", 3, "--max-drop", 100, "--target", "pytorch"]


@pytest.fixture(scope="module")
def halved_experiment(narrow_teacher, tmp_path_factory):
    """Successive halving of three sparsities in an NNI experiment: 1 epoch each, then 1
    more for those the advisor continues (nni_halving.py), two trials at a time."""
    folder = tmp_path_factory.mktemp("nni_halving")
    os.symlink(narrow_teacher / "dataset", folder / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", folder / "vgg16Net.pth")
    (folder / "local.yml").write_text("trainingService:\n  platform: local\n")
    port = free_port()
    command = ["sweep.py", *HALVING, "--port", port, "--nni-config", folder / "local.yml"]
    proc = run_script(*command, cwd=folder, env=nni_env(folder / "home"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return types.SimpleNamespace(folder=folder, out=folder / "sweep", port=port, proc=proc,
                                 command=command,
                                 rows=json.loads((folder / "sweep" / "sweep.json").read_text()))


def test_an_nni_halving_continues_the_settings_the_plain_sweeps_rule_picks(halved_experiment):
    out, rows = halved_experiment.out, halved_experiment.rows[1:]
    assert sorted(row["name"] for row in rows) == ["l1-0.5", "l1-0.8", "l1-0.9"]
    standings = {row["name"]: row["stages"][0] for row in rows}
    kept = rules.survivors(standings, 100)
    assert kept  # (the rule's own cases: tests/end_to_end/test_halving.py)
    parameters = job_parameters(out)
    for row in rows:
        continued = row["name"] in kept
        assert [stage["epochs"] for stage in row["stages"]] == ([1, 1] if continued else [1])
        assert row["stages"][0]["continued"] is continued and row["epochs"] == len(row["stages"])
        first, last = row["stages"][0]["trial"], row["stages"][-1]["trial"]
        assert parameters[first]["stage"] == 0 and parameters[first]["continues"] is None
        assert Path(row["path"]).parent == out.resolve() / "trials" / last
        if continued:  # a new trial, that started from the first one's student
            assert parameters[last] == {"method": "l1", "sparsity": row["sparsity"], "stage": 1,
                                        "continues": first}
            started = out / "trials" / last / f"{row['name']}.stage1.pth"
            assert started.read_bytes() == (out / "trials" / first / f"{row['name']}.pth"
                                            ).read_bytes()
    assert len(parameters) == 3 + len(kept)
    assert "successive halving of 3 settings" in halved_experiment.proc.stdout
    picked, = [row for row in rows if row["picked"]]
    assert (out / f"{picked['name']}.pth").read_bytes() == Path(picked["path"]).read_bytes()


def test_an_nni_halving_run_again_resumes_and_distils_nothing(halved_experiment):
    folder, out = halved_experiment.folder, halved_experiment.out
    students = {row["path"]: os.stat(row["path"]).st_mtime_ns
                for row in halved_experiment.rows[1:]}
    proc = run_script(*halved_experiment.command, cwd=folder, env=nni_env(folder / "home"))
    assert proc.returncode == 0, proc.stderr
    assert " resumed:" in proc.stdout
    assert len(job_parameters(out)) == len(halved_experiment.rows[1:]) + sum(
        row["stages"][0]["continued"] for row in halved_experiment.rows[1:])
    assert {path: os.stat(path).st_mtime_ns for path in students} == students
    assert processes_of(out) == []


# --- refusals: one line, nothing started ---

@pytest.fixture
def teacher_folder(tmp_path, monkeypatch):
    """A folder to be refused in, its own HOME for NNI's manifest (the refusals run sweep.py's
    CLI edge in this process: nothing they test needs a process of their own)."""
    small_checkpoint(tmp_path / "vgg16Net.pth")
    for part in ("train", "val"):  # (class folders without pictures: nothing runs that far)
        (tmp_path / "dataset" / part / "cat").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def sweep_here(folder, *flags):
    return run_in_process(sweep, *flags, cwd=folder)


@pytest.mark.parametrize("flags, named", [
    (["--sparsities", 0.5, 0.8], "--max-drop"),
    (["--max-drop", 1, "--sparsities", 0.5], "one setting"),
    (["--max-drop", 1, "--sparsities", 0.5, 0.8, "--search", "l1"], "--search"),
    (["--max-drop", 1, "--sparsities", 0.5, 0.8, "--mobilenet-v2"], "--mobilenet-v2"),
    (["--max-drop", 1, "--sparsities", 0.5, 0.8, "--nni-config", "missing.yml"], "missing.yml"),
])
def test_bad_engine_flags_are_one_line_errors(teacher_folder, flags, named):
    assert_clean_error(sweep_here(teacher_folder, "--engine", "nni", *flags), named)


def test_a_taken_port_is_a_one_line_error_and_starts_nothing(teacher_folder):
    """(The one refusal that runs sweep.py as its own process, as a user's terminal does.)"""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_script("sweep.py", "--engine", "nni", "--max-drop", 1, "--sparsities", 0.5,
                          0.8, "--port", port, cwd=teacher_folder,
                          env=nni_env(teacher_folder / "home"))
    assert_clean_error(proc, f"--port {port}")
    assert processes_of(teacher_folder / "sweep") == []


@pytest.mark.parametrize("yaml, named", [
    ("trialCommand: python3 train.py\ntrainingService:\n  platform: local\n", "trial_command"),
    ("trainingService:\n  platform: local\n  trialCommand: python3 train.py\n",
     "trainingService trial_command"),
    ("trainingService:\n  platform: local\nsearchSpace: {}\n", "search_space"),
    ("trialConcurrency: 2\n", "not an NNI experiment config"),  # no training service
    ("trialConcurrency: 0\ntrainingService:\n  platform: local\n", "not an NNI experiment"),
    ("trainingService: [unclosed\n", "not an NNI experiment config"),
    ("tuner:\n  nme: TPE\ntrainingService:\n  platform: local\n", "not an NNI experiment"),
    ("- a list\n", "not an NNI experiment config"),
])
def test_a_bad_nni_config_is_a_one_line_error(teacher_folder, yaml, named):
    (teacher_folder / "config.yml").write_text(yaml)
    proc = sweep_here(teacher_folder, "--engine", "nni", "--max-drop", 1, "--sparsities", 0.5,
                      0.8, "--nni-config", "config.yml")
    assert_clean_error(proc, "config.yml", named)
    assert processes_of(teacher_folder / "sweep") == []


def test_nni_config_settings_win_and_sweep_fills_the_rest(tmp_path):
    (tmp_path / "config.yml").write_text(
        "trialConcurrency: 3\nmaxTrialNumber: 5\ntrainingService:\n  platform: local\n")
    space = {"sparsity": {"_type": "quniform", "_value": [0.5, 0.9, 0.025]}}

    def command(concurrency):
        return f"python3 sweep.py --concurrency {concurrency}"

    config = nni_config.make_config(str(tmp_path / "config.yml"), command, ".", space,
                                    trials=8, concurrency=2, assessor_start=2, seed=0,
                                    working_directory=str(tmp_path / "nni"))
    assert (config.trial_concurrency, config.max_trial_number) == (3, 5)
    assert config.trial_command == "python3 sweep.py --concurrency 3"  # (threads per trial)
    assert config.tuner.name == "TPE" and config.assessor.name == "Medianstop"
    assert config.tuner.class_args["tpe_args"]["n_startup_jobs"] == 3  # half of 5, at least 3
    assert config.assessor.class_args["start_step"] == 2
    local = nni_config.make_config(None, command, ".", {}, trials=8, concurrency=2,
                                   assessor_start=2, seed=0,
                                   working_directory=str(tmp_path / "nni"))
    assert (local.trial_concurrency, local.max_trial_number) == (2, 8)
    assert local.tuner.class_args["tpe_args"]["n_startup_jobs"] == 4


def test_a_trial_run_by_hand_is_refused(teacher_folder):
    assert_clean_error(sweep_here(teacher_folder, "--nni-trial", "--max-drop", 1), "--nni-trial")


def test_plain_sweep_and_nni_experiment_do_not_share_a_folder(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps([
        {"name": "dense", "kind": "dense"},
        {"name": "l1-0.5 [abc]", "engine": "nni", "training": {}}]))
    with pytest.raises(UserError, match="--engine nni"):
        plain.read_report(str(tmp_path / "sweep.json"), "plain")
    assert len(plain.read_report(str(tmp_path / "sweep.json"), "nni")) == 1


# --- the objective, the pairing check and the assessor's savings ---

def test_objective_ranks_every_student_within_budget_above_every_one_outside():
    dense = 0.9
    within = [experiment.objective(a, dense, s, 1.0)
              for a, s in [(0.9, 1.5), (0.89, 4.0), (0.95, 2)]]
    outside = [experiment.objective(a, dense, s, 1.0) for a, s in [(0.889, 30.0), (0.5, 50.0)]]
    assert within == [1.5, 4.0, 2]
    assert min(within) > max(outside)
    assert outside[0] > outside[1]  # a near miss beats a far one
    assert outside[0] == pytest.approx(-0.1)


def trial(id, status, parameters=None, epochs=(), times=(), final=None, start=0, end=0):
    return nni_engine.Trial(id, status, parameters, list(epochs), list(times), final, start,
                            end, "")


def test_a_result_of_other_parameters_than_its_trial_ran_is_refused():
    final = {"trial": "A", "parameters": {"method": "l1", "sparsity": 0.5}, "name": "l1-0.5",
             "method": "l1", "global": False, "sparsity": 0.5, "path": "x.pth",
             "accuracy": 0.9, "params": 10}
    rows = experiment.reported_rows([trial("A", "SUCCEEDED", final["parameters"], final=final,
                                      end=60000)], {})
    assert rows[0]["reported"] is final and rows[0]["minutes"] == 1.0
    with pytest.raises(CheckFailed, match="trial B"):
        experiment.reported_rows([trial("B", "SUCCEEDED", final["parameters"], final=final)], {})
    with pytest.raises(CheckFailed, match="trial A"):
        experiment.reported_rows([trial("A", "SUCCEEDED", {"method": "l1", "sparsity": 0.7},
                                   final=final)], {})


def test_assessor_savings_count_the_epochs_a_stopped_trial_did_not_run():
    stopped = trial("S", "EARLY_STOPPED", epochs=[0.5, 0.6], times=[30_000, 40_000], start=0)
    finished = trial("F", "SUCCEEDED", epochs=[0.5] * 5, times=[1, 2, 3, 4, 5])
    assert nni_engine.assessor_savings([stopped, finished], epochs=5) == (1, 30.0)


