"""Specification of sweep.py --engine nni when something stops it: Ctrl-C, a trial that
crashes, a tuner that fails, never answers, or runs out of settings. Each runs a tiny
experiment (tests/helpers.py's NNI_TINY) from conftest's narrow_teacher.

- Ctrl-C stops the manager and the trials, frees the port and says how to resume; the
  manager listens on 127.0.0.1 only; the same command then completes the experiment.
- A crashing trial is reported with its log's last lines and the experiment completes.
- A tuner that raises, or gives no setting for PATIENCE_SECONDS, stops the experiment
  with the finished trial measured (exit status 1), nothing left running.
- A search space smaller than the trials ends when the tuner has nothing more to give.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from compress.sweep import nni_engine
from helpers import (NNI_TINY, REPO, free_port, local_config, nni_env, port_is_free,
                     processes_of, run_script)

pytestmark = pytest.mark.slow  # (every test runs an NNI experiment)

TINY = NNI_TINY


def test_ctrl_c_stops_everything_frees_the_port_and_the_same_command_resumes(narrow_teacher,
                                                                             tmp_path):
    os.symlink(narrow_teacher / "dataset", tmp_path / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    port = free_port()
    command = [sys.executable, str(REPO / "sweep.py"), *map(str, TINY), "--trials", "2",
               "--kd-epochs", "8", "--port", str(port), "--nni-config", str(local_config(tmp_path))]
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    # (a shell running commands in the background hands them SIGINT ignored: a terminal's
    # Ctrl-C is what this test means)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = tmp_path / "sweep"
    deadline = time.time() + 300
    while not list(out.glob("trials/*/*.history.json")):  # a trial is distilling
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.5)
    listening = [c.laddr for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    assert processes_of(out) == []
    assert port_is_free(port)

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert " resumed:" in again.stdout
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 3 and all(len(row["reported"]["epochs"]) == 8 for row in rows[1:])
    assert processes_of(out) == []


CRASH_ONE_TRIAL = r"""
import os, sys
if "--nni-trial" in sys.argv:  # the first trial to start crashes
    try:
        os.close(os.open(os.environ["CRASH_MARKER"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:  # (an exception here would only be reported: Python goes on after sitecustomize)
        sys.stderr.write("Traceback (most recent call last):\n"
                         "RuntimeError: simulated crash of one trial\n")
        sys.stderr.flush()
        os._exit(1)
"""


def test_a_crashing_trial_is_reported_and_the_experiment_completes(narrow_teacher, tmp_path):
    os.symlink(narrow_teacher / "dataset", tmp_path / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASH_ONE_TRIAL)
    proc = run_script("sweep.py", *TINY, "--trials", 2, "--port", free_port(),
                      "--nni-config", local_config(tmp_path), cwd=tmp_path,
                      env=nni_env(tmp_path / "home", PYTHONPATH=hooks,
                                  CRASH_MARKER=tmp_path / "crashed"))
    assert proc.returncode == 0, proc.stderr
    assert "failed; its log ends:" in proc.stdout
    assert "RuntimeError: simulated crash of one trial" in proc.stdout
    assert "2 trials: 1 finished, 0 stopped early by the assessor" in proc.stdout
    assert "1 failed" in proc.stdout
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(rows) == 2  # the dense model and the trial that finished
    assert processes_of(tmp_path / "sweep") == []


def test_a_search_space_smaller_than_the_trials_ends_when_the_tuner_runs_out(narrow_teacher,
                                                                            tmp_path):
    """TPE never proposes a setting twice: NNI then waits at TUNER_NO_MORE_TRIAL forever."""
    os.symlink(narrow_teacher / "dataset", tmp_path / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    tiny = [*TINY[:-2], 0.5, 0.525, "--kd-epochs", 1]  # two settings
    proc = run_script("sweep.py", *tiny, "--trials", 4, "--port", free_port(),
                      "--nni-config", local_config(tmp_path), cwd=tmp_path,
                      env=nni_env(tmp_path / "home"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 trials: 2 finished" in proc.stdout
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sorted(row["sparsity"] for row in rows[1:]) == [0.5, 0.525]
    assert processes_of(tmp_path / "sweep") == []




FAILING_TUNER = """
import time

from nni.tuner import Tuner


class SecondSettingFails(Tuner):
    '''Gives one setting, then raises (hang=False) or never answers (hang=True).'''

    def __init__(self, hang=False):
        self.hang, self.given = hang, 0

    def update_search_space(self, search_space):
        pass

    def generate_parameters(self, parameter_id, **kwargs):
        self.given += 1
        if self.given > 1:
            if self.hang:
                time.sleep(3600)
            raise RuntimeError("simulated tuner failure")
        return {"method": "l1", "sparsity": 0.5}

    def receive_trial_result(self, parameter_id, parameters, value, **kwargs):
        pass
"""


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "hangs"])
def test_a_tuner_that_stops_answering_is_reported_and_the_finished_trial_measured(
        narrow_teacher, tmp_path, hang):
    os.symlink(narrow_teacher / "dataset", tmp_path / "dataset")
    os.symlink(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "failing_tuner.py").write_text(FAILING_TUNER)
    (tmp_path / "failing.yml").write_text(
        "trainingService:\n  platform: local\n"
        "tuner:\n  className: failing_tuner.SecondSettingFails\n"
        f"  codeDirectory: {hooks}\n  classArgs:\n    hang: {str(hang).lower()}\n"
        "assessor:\n  name: Medianstop\n  classArgs:\n    optimize_mode: maximize\n"
        "    start_step: 99\n")
    proc = run_script("sweep.py", *TINY, "--kd-epochs", 1, "--concurrency", 1, "--trials", 3,
                      "--port", free_port(), "--nni-config", tmp_path / "failing.yml",
                      cwd=tmp_path, env=nni_env(tmp_path / "home"), timeout=300)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]  # (after the trials' bar)
    assert last.startswith("sweep.py: error: the NNI experiment") and "Traceback" not in proc.stderr
    assert "stopped it after 1 of 3 trials, and measured the 1 finished" in last
    if hang:  # noticed within a minute of the trial's end
        idle = int(re.search(r"gave no setting for (\d+)s", last).group(1))
        assert nni_engine.PATIENCE_SECONDS <= idle < 60
    else:
        assert "RuntimeError: simulated tuner failure" in last
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["name"] for row in rows][0] == "dense" and len(rows) == 2
    assert processes_of(tmp_path / "sweep") == []
