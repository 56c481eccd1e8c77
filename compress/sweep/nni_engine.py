"""NNI 3.0's experiment engine, as sweep.py --engine nni drives it (and five mends of it).

- `make_config()`: NNI's ExperimentConfig -- the user's --nni-config YAML (any of NNI's
  training services: local, remote machines, a cluster) or this machine, completed with
  our trial command, search space, TPE tuner and Medianstop assessor.
- `NniExperiment`: creates the experiment, or resumes it (NNI's own resume: finished
  trials are kept), with NNI's manager listening on one address only (127.0.0.1 unless
  asked), each trial given its own parameters (mends of NNI 3.0, see MANAGER_PRELOAD),
  and the manager given the time it needs to start (patient_launcher); `follow()` yields
  each trial when it changes and notices a tuner that stops answering (TunerStopped);
  `stop()` stops the manager, its tuner and its trials, and frees the port. NNI 3.0's
  TPE is kept from its numpy-2 failure (MIN_STARTUP_JOBS).
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
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from compress.cli import CheckFailed, UserError, quiet_nni
from compress.machine import processes

if TYPE_CHECKING:
    from nni.experiment import ExperimentConfig

TUNER, ASSESSOR = "TPE", "Medianstop"
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
# NNI 3.0's TPE fails as soon as it models a parameter from one result: that result is
# all "below", the empty "above" becomes a float array, and numpy 2's np.bincount refuses
# it (TypeError: Cannot cast ... float64 to int64). Its thread dies, its process lives on,
# and the experiment waits for ever (seen with --trials 2 or 3 at --concurrency 1, whose
# n_startup_jobs was 1). Two random trials first, it never models fewer than two results,
# and "above" is never empty (tests/library/test_nni_tuner.py drives NNI's TPE so).
MIN_STARTUP_JOBS = 2
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


def make_config(nni_config: str | None, trial_command_for: Callable[[int], str],
                code_directory: str, search_space: dict, trials: int, concurrency: int,
                assessor_start: int, seed: int, working_directory: str) -> ExperimentConfig:
    """The experiment's config: --nni-config's YAML (its settings win) or the local machine,
    and what sweep.py sets; `trial_command_for(concurrency)` is the trial command."""
    from nni.experiment import ExperimentConfig

    if not nni_config:
        return complete(ExperimentConfig("local"), trial_command_for, code_directory,
                        search_space, trials, concurrency, assessor_start, seed,
                        working_directory)
    try:
        config = ExperimentConfig.load(nni_config)
        services = config.training_service
        services = services if isinstance(services, list) else [services]
        ours = [name for name in ("trial_command", "search_space", "search_space_file")
                if getattr(config, name) is not None]
        ours += [f"trainingService {name}" for service in services
                 for name in ("trial_command", "trial_code_directory")
                 if not unset_field(getattr(service, name, None))]
        if ours:
            raise UserError(f"--nni-config {nni_config}: sets {', '.join(ours)}, which "
                            "sweep.py sets itself (from its flags)")
        return complete(config, trial_command_for, code_directory, search_space, trials,
                        concurrency, assessor_start, seed, working_directory)
    except UserError:
        raise
    except Exception as error:  # NNI's config classes raise anything from yaml to asserts
        raise UserError(f"--nni-config {nni_config}: not an NNI experiment config "
                        f"({one_line(error)})") from None


def complete(config: ExperimentConfig, trial_command_for: Callable[[int], str],
             code_directory: str, search_space: dict, trials: int, concurrency: int,
             assessor_start: int, seed: int, working_directory: str) -> ExperimentConfig:
    """`config` with what it leaves unset filled in, and what sweep.py sets, validated."""
    from nni.experiment.config import AlgorithmConfig, utils

    if utils.is_missing(config.trial_concurrency):
        config.trial_concurrency = concurrency
    if config.max_trial_number is None:
        config.max_trial_number = trials
    config.trial_command = trial_command_for(config.trial_concurrency)
    config.trial_code_directory = code_directory
    config.search_space = search_space
    config.experiment_working_directory = working_directory
    if unset(config.tuner):
        # NNI's TPE draws its first 20 trials at random: a small experiment would be only that
        config.tuner = AlgorithmConfig(name=TUNER, class_args={
            "optimize_mode": "maximize", "seed": seed, "tpe_args": {
                "n_startup_jobs": max(MIN_STARTUP_JOBS, config.trial_concurrency,
                                      config.max_trial_number // 2)}})
    else:
        check_tuner(config.tuner)
    if unset(config.assessor):
        # (Medianstop's default judges from the first epoch, when a student's accuracy
        # says little yet)
        config.assessor = AlgorithmConfig(name=ASSESSOR, class_args={
            "optimize_mode": "maximize", "start_step": assessor_start})
    config.validate()
    return config


def check_tuner(tuner: object) -> None:
    """Refuse a TPE tuner that NNI 3.0 breaks on under numpy 2 (see MIN_STARTUP_JOBS)."""
    if getattr(tuner, "name", None) != TUNER:
        return
    startup = ((tuner.class_args or {}).get("tpe_args") or {}).get("n_startup_jobs", 20)
    if startup < MIN_STARTUP_JOBS:
        raise UserError(f"tuner TPE with n_startup_jobs {startup}: NNI 3.0's TPE fails under "
                        f"numpy 2 when it models a single result, and the experiment would "
                        f"wait for ever; give n_startup_jobs {MIN_STARTUP_JOBS} or more")


def unset_field(value: object) -> bool:
    """Whether a config field is not given (None, or NNI's placeholder for missing)."""
    from nni.experiment.config import utils
    return value is None or utils.is_missing(value)


def unset(algorithm: object) -> bool:
    """Whether a tuner or assessor is not given (ExperimentConfig's placeholder is '_none_')."""
    if isinstance(algorithm, dict):  # what NNI's loader leaves of a block it does not know
        raise ValueError(f"not a tuner or assessor: {algorithm}")
    return algorithm is None or (algorithm.name in (None, "_none_")
                                 and algorithm.class_name is None)


def check_port(host: str, port: int) -> None:
    """A UserError unless `port` on `host` is free for the manager (and its web portal)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Node.js binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--port {port} on {host}: cannot listen there ({error.strerror}); "
                            "give another --port (or --host)") from None


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


def one_line(error: BaseException) -> str:
    """The last line of an error's message (its type's name if it has none)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
