"""NNI 3.0's experiment engine, as sweep.py --engine nni drives it (and four mends of it).

- `NniExperiment`: creates the experiment, or resumes it (NNI's own resume: finished
  trials are kept), with NNI's manager listening on one address only (127.0.0.1 unless
  asked), each trial given its own parameters (mends of NNI 3.0, see MANAGER_PRELOAD),
  and the manager given the time it needs to start (patient_launcher); `follow()` yields
  each trial when it changes and notices a tuner that stops answering (TunerStopped);
  `stop()` stops the manager, its tuner and its trials, and frees the port. (Its
  configuration: nni_config.py.)
- `Trial`: one trial as NNI recorded it (status, parameters, per-epoch and final
  results, times); `last_lines()` shows a failed trial's log; `assessor_savings()` what
  the early stops saved.

Imports nothing of the pipeline's stages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from compress.cli import CheckFailed, UserError, quiet_nni
from compress.machine import processes
from compress.sweep.nni_config import check_port, one_line

if TYPE_CHECKING:
    from nni.experiment import ExperimentConfig

# Given to NNI's manager (Node.js) through NODE_OPTIONS (nni_manager_preload.js beside
# this file), three mends of NNI 3.0:
# - it listens on every address and has no option for it: a listen(port) call gets the
#   address of $SWEEP_NNI_HOST;
# - its V3 training services (local, remote) queue the tuner's parameters and hand them to
#   trials in the order the trials ask, not to the trial each was submitted for: with two
#   trials starting together, each may run the other's parameters while NNI's records, its
#   portal, its tuner's bookkeeping (NNI's TPE then crashes with a KeyError) and a resumed
#   experiment's history pair them the other way. Each trial is given its own;
# - a trial its assessor stops ends as USER_CANCELED, as if a user had stopped it: the
#   "early stopped" mark is set only after the trial has ended. It is set before.
MANAGER_PRELOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "nni_manager_preload.js")
FINISHED = ("SUCCEEDED", "FAILED", "EARLY_STOPPED", "USER_CANCELED", "SYS_CANCELED")
# No trial waiting or running, settings left to run, and no new trial for this long: the
# tuner has stopped answering (NNI submits the next trial a few seconds after one ends).
PATIENCE_SECONDS = 45
# NNI 3.0's launcher gives its manager three tries a second apart to answer /check-status
# with JSON; until the manager has mounted its REST handlers it answers there with the
# plain word INITIALIZING, so on a busy machine the start failed with "Expecting value:
# line 1 column 1 (char 0)" (seen twice in the test suite, three experiments and a training
# running). The manager is given this long to answer.
MANAGER_START_SECONDS = 60


@contextlib.contextmanager
def patient_launcher(seconds: float) -> Iterator[None]:
    """NNI's launcher waiting up to `seconds` for its manager's first JSON answer (see
    MANAGER_START_SECONDS), not three."""
    from nni.experiment import launcher, rest

    def check_rest_server(port: int, retry: int = 3, url_prefix: str | None = None) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                rest.get(port, "/check-status", url_prefix)
                return
            except Exception:  # not listening yet, or INITIALIZING (not JSON)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    original = launcher._check_rest_server
    launcher._check_rest_server = check_rest_server
    try:
        yield
    finally:
        launcher._check_rest_server = original


class TunerStopped(CheckFailed):
    """NNI's tuner (or assessor) stopped answering: the experiment cannot go on."""


@dataclasses.dataclass
class Trial:
    """One trial as NNI recorded it."""
    id: str
    status: str
    parameters: dict  # what the trial ran (see NniExperiment.trials), or None
    epochs: list  # the per-epoch results reported, in order
    epoch_times: list  # when each was reported (ms since the epoch)
    final: dict  # the final result reported, or None
    start: int  # ms since the epoch, or None
    end: int
    log_folder: str

    @property
    def succeeded(self):
        """Ended well and reported its result."""
        return self.status == "SUCCEEDED" and self.final is not None

    @property
    def failed(self):
        """Crashed, or ended without reporting a result."""
        return self.status == "FAILED" or self.status == "SUCCEEDED" and self.final is None

    def last_lines(self, count: int = 5) -> list[str]:
        """The last lines of the trial's error output (progress bars left out)."""
        try:
            with open(os.path.join(self.log_folder, "trial.stderr"), errors="replace") as file:
                text = file.read()[-20000:]
        except OSError:
            return [f"(no log found in {self.log_folder})"]
        lines = [line.strip() for chunk in text.split("\n") for line in chunk.split("\r")[-1:]]
        return [line for line in lines if line][-count:]


class NniExperiment:
    """An NNI experiment of `config`, known to NNI by `experiment_id`, its manager on
    host:port."""

    def __init__(self, config: ExperimentConfig, experiment_id: str, host: str, port: int,
                 verbose: bool = False):
        from nni.experiment import Experiment

        self.experiment = Experiment(config, id=experiment_id)
        self.host, self.port, self.verbose = host, port, verbose
        self.running = False
        self.latest = []

    def start(self) -> str:
        """Resume the experiment if NNI has it (finished trials are kept), else create it;
        returns 'resumed' or 'created'. Ctrl-C or `kill` meanwhile wait until it is done
        (then stop it): NNI's manager half started would be left running."""
        check_port(self.host, self.port)
        folder = os.path.join(self.experiment.config.experiment_working_directory,
                              self.experiment.id)
        with quiet_nni(self.verbose), processes.deferred_signals():
            try:  # (NNI's list of experiments is in ~/nni-experiments)
                self.tuner_log_start = file_size(os.path.join(self.log_folder, "dispatcher.log"))
                os.makedirs(folder, exist_ok=True)
                preload = os.path.join(folder, "manager_preload.js")
                shutil.copyfile(MANAGER_PRELOAD, preload)
                resume = self.experiment.has_checkpoint()
                if not resume and os.path.isdir(os.path.join(folder, "db")):
                    raise UserError(f"{folder}: NNI does not know this experiment (its list in "
                                    "~/nni-experiments lacks it) and would mix a new one into "
                                    "its files; give another --output-dir")
                options = os.environ.get("NODE_OPTIONS", "")
                node_options = f'{options} --require "{preload}"'.strip()
                with processes.environment_set({"NODE_OPTIONS": node_options,
                                                "SWEEP_NNI_HOST": self.host}), \
                        patient_launcher(MANAGER_START_SECONDS):
                    if resume:
                        self.experiment.resume(self.port, wait_completion=False)
                    else:
                        self.experiment.start(self.port)
                self.running = True
            except UserError:
                raise
            except Exception as error:  # NNI raises bare RuntimeErrors, requests' errors...
                self.stop()
                raise UserError(f"NNI's manager did not start ({one_line(error)}); its log: "
                                f"{os.path.join(folder, 'log', 'nnimanager.log')}") from None
        return "resumed" if resume else "created"

    def status(self) -> str:
        """NNI's word for where the experiment stands (RUNNING, DONE, ...)."""
        return self.experiment.get_status()

    def trials(self) -> list[Trial]:
        """Every trial so far, as NNI recorded it, in the order NNI started them.

        A trial's parameters are those of the parameter ID its own results carry (None
        before its first result): what it ran, whatever NNI's job record says (unmended,
        NNI 3.0 records another trial's parameters for it; see MANAGER_PRELOAD)."""
        jobs = sorted(self.experiment.list_trial_jobs(), key=lambda job: job.sequenceId)
        generated = {str(p.parameter_id): p.parameters
                     for job in jobs for p in job.hyperParameters or []}
        metrics = self.experiment.get_job_metrics()
        trials = []
        for job in jobs:
            # a trial that a resumed experiment runs again keeps its ID: its latest run's
            # results are those reported since it (re)started
            results = sorted((m for m in metrics.get(job.trialJobId, [])
                              if job.startTime and m.timestamp >= job.startTime),
                             key=lambda m: m.timestamp)
            periodic = [m for m in results if m.type == "PERIODICAL"]
            finals = [m for m in results if m.type == "FINAL"]
            final = finals[-1].data if finals else None
            trials.append(Trial(
                job.trialJobId, job.status,
                generated.get(str(results[-1].parameterId)) if results else None,
                [metric_value(m.data) for m in periodic], [m.timestamp for m in periodic],
                json.loads(final) if isinstance(final, str) else final,
                job.startTime, job.endTime, job.logPath))
        return trials

    def follow(self, every: float = 2.0,
               patience: float = PATIENCE_SECONDS) -> Iterator[Trial]:
        """Yield each trial when it starts, reports an epoch or finishes, until the
        experiment is done; `self.latest` holds every trial as last seen.

        TunerStopped if the tuner or assessor stops answering: NNI's manager reports an
        error, the tuner's log holds one (a dead thread leaves its process alive), or no
        trial waits or runs for `patience` seconds while settings remain."""
        seen = {}
        idle_since = time.monotonic()
        while True:
            status = self.status()
            trials = self.latest = self.trials()
            for trial in trials:
                state = (trial.status, len(trial.epochs), trial.final is not None)
                if seen.get(trial.id) != state:
                    seen[trial.id] = state
                    yield trial
            busy = any(trial.status in ("WAITING", "RUNNING", "UNKNOWN") for trial in trials)
            if status in ("DONE", "STOPPED") or status == "TUNER_NO_MORE_TRIAL" and not busy:
                return  # (NNI stays at TUNER_NO_MORE_TRIAL: TPE never repeats a setting)
            if busy or len(trials) >= self.experiment.config.max_trial_number:
                idle_since = time.monotonic()
            problem = self.tuner_problem(status, time.monotonic() - idle_since, patience)
            if problem and self.status() not in ("DONE", "STOPPED"):
                raise TunerStopped(f"the NNI experiment {self.experiment.id} cannot go on: "
                                   f"{problem}; its logs: {self.log_folder}")
            time.sleep(every)

    def tuner_problem(self, status: str, idle: float, patience: float) -> str | None:
        """Why the tuner will give no more settings, if it will not (see follow())."""
        if status == "ERROR":
            return self.tuner_error() or "NNI's manager reports an error"
        log = self.tuner_log()
        if "Dispatcher exiting" in log or "Traceback (most recent call last)" in log:
            return self.tuner_error() or "its tuner process ended"
        if idle > patience:
            return (f"its tuner gave no setting for {idle:.0f}s while no trial ran "
                    f"({len(self.latest)} of {self.experiment.config.max_trial_number} "
                    "trials started)")
        return None

    @property
    def log_folder(self) -> str:
        """Where NNI keeps this experiment's logs."""
        return os.path.join(self.experiment.config.experiment_working_directory,
                            self.experiment.id, "log")

    def tuner_log(self) -> str:
        """What NNI's tuner process logged since this start (its log is kept across runs)."""
        try:
            with open(os.path.join(self.log_folder, "dispatcher.log"), errors="replace") as file:
                file.seek(self.tuner_log_start)
                return file.read()
        except OSError:
            return ""

    def tuner_error(self) -> str | None:
        """The tuner's last error line (the exception), if its log holds one."""
        lines = self.tuner_log().splitlines()
        errors = [line for line in lines if line and not line.startswith((" ", "[", "Traceback"))]
        return f"its tuner or assessor failed ({errors[-1]})" if errors else None

    def stop(self) -> None:
        """Stop the manager, its tuner and its trials (NNI keeps all it needs to resume);
        a second Ctrl-C meanwhile is ignored, or processes would be left running."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            with quiet_nni(self.verbose):
                self.experiment.stop()
            # a tuner stuck in its own code outlives NNI's stop, holding our terminal's
            # output open (seen with a tuner that never answers): it goes too
            processes.end(processes.tuners(self.experiment.config.experiment_working_directory))
        finally:
            signal.signal(signal.SIGINT, previous)
            self.running = False


def new_id() -> str:
    """A new experiment ID (NNI's kind: 8 letters and digits)."""
    from nni.experiment import management
    return management.generate_experiment_id()


def metric_value(data: object) -> float:
    """An NNI metric's number: the value itself, or its 'default' entry."""
    if isinstance(data, str):
        data = json.loads(data)
    return data["default"] if isinstance(data, dict) else data


def assessor_savings(trials: Sequence[Trial], epochs: int) -> tuple[int, float]:
    """(trials stopped early, seconds saved): each stopped trial's epochs not run, at the
    pace of its own reported epochs (the first epoch's pace: from its start)."""
    stopped = [t for t in trials if t.status == "EARLY_STOPPED"]
    saved = 0.0
    for trial in stopped:
        if trial.epochs and trial.start is not None:
            pace = (trial.epoch_times[-1] - trial.start) / len(trial.epochs)
            if len(trial.epochs) > 1:  # the first interval also holds the pruning
                pace = (trial.epoch_times[-1] - trial.epoch_times[0]) / (len(trial.epochs) - 1)
            saved += (epochs - len(trial.epochs)) * pace / 1000
    return len(stopped), saved


def file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0
