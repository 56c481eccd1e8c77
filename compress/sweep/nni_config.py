"""The NNI experiment's configuration, as sweep.py --engine nni asks NNI 3.0 for it.

- `make_config()`: NNI's ExperimentConfig -- the user's --nni-config YAML (any of NNI's
  training services: local, remote machines, a cluster) or this machine, completed with
  our trial command, search space, TPE tuner and Medianstop assessor (or, for successive
  halving, the advisor of nni_halving.py in their place); NNI 3.0's TPE is kept from its
  numpy-2 failure (MIN_STARTUP_JOBS).
- `check_port()`: the manager's port is free, said before any work.

Imports nothing of the pipeline's stages.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from compress.cli import UserError

if TYPE_CHECKING:
    from nni.experiment import ExperimentConfig

TUNER, ASSESSOR = "TPE", "Medianstop"
ADVISOR = "compress.sweep.nni_halving.SuccessiveHalving"  # (of successive halving)
# NNI 3.0's TPE fails as soon as it models a parameter from one result: that result is
# all "below", the empty "above" becomes a float array, and numpy 2's np.bincount refuses
# it (TypeError: Cannot cast ... float64 to int64). Its thread dies, its process lives on,
# and the experiment waits for ever (seen with --trials 2 or 3 at --concurrency 1, whose
# n_startup_jobs was 1). Two random trials first, it never models fewer than two results,
# and "above" is never empty (tests/library/test_nni_tuner.py drives NNI's TPE so).
MIN_STARTUP_JOBS = 2


def make_config(nni_config: str | None, trial_command_for: Callable[[int], str],
                code_directory: str, search_space: dict, trials: int, concurrency: int,
                assessor_start: int, seed: int, working_directory: str,
                halving: dict | None = None) -> ExperimentConfig:
    """The experiment's config: --nni-config's YAML (its settings win) or the local machine,
    and what sweep.py sets; `trial_command_for(concurrency)` is the trial command. With
    `halving` (the class arguments of nni_halving.SuccessiveHalving), that advisor runs in
    place of the tuner and the assessor (refused if the YAML sets either)."""
    from nni.experiment import ExperimentConfig

    if not nni_config:
        return complete(ExperimentConfig("local"), trial_command_for, code_directory,
                        search_space, trials, concurrency, assessor_start, seed,
                        working_directory, halving)
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
        replaced = [name for name in ("tuner", "assessor")
                    if not unset(getattr(config, name))]
        replaced += ["maxTrialNumber"] if config.max_trial_number is not None else []
        if halving and replaced:
            raise UserError(f"--nni-config {nni_config}: sets {' and '.join(replaced)}, which "
                            "successive halving (several --kd-epochs) decides with its own "
                            "advisor; drop it, or give one --kd-epochs")
        return complete(config, trial_command_for, code_directory, search_space, trials,
                        concurrency, assessor_start, seed, working_directory, halving)
    except UserError:
        raise
    except Exception as error:  # NNI's config classes raise anything from yaml to asserts
        raise UserError(f"--nni-config {nni_config}: not an NNI experiment config "
                        f"({one_line(error)})") from None


def complete(config: ExperimentConfig, trial_command_for: Callable[[int], str],
             code_directory: str, search_space: dict, trials: int, concurrency: int,
             assessor_start: int, seed: int, working_directory: str,
             halving: dict | None = None) -> ExperimentConfig:
    """`config` with what it leaves unset filled in, and what sweep.py sets, validated."""
    from nni.experiment.config import AlgorithmConfig, CustomAlgorithmConfig, utils

    if utils.is_missing(config.trial_concurrency):
        config.trial_concurrency = concurrency
    if config.max_trial_number is None:
        config.max_trial_number = trials
    config.trial_command = trial_command_for(config.trial_concurrency)
    config.trial_code_directory = code_directory
    config.search_space = search_space
    config.experiment_working_directory = working_directory
    if halving:
        config.tuner = CustomAlgorithmConfig(class_name=ADVISOR, code_directory=code_directory,
                                             class_args=halving)
        config.assessor = None
    elif unset(config.tuner):
        # NNI's TPE draws its first 20 trials at random: a small experiment would be only that
        config.tuner = AlgorithmConfig(name=TUNER, class_args={
            "optimize_mode": "maximize", "seed": seed, "tpe_args": {
                "n_startup_jobs": max(MIN_STARTUP_JOBS, config.trial_concurrency,
                                      config.max_trial_number // 2)}})
    else:
        check_tuner(config.tuner)
    if not halving and unset(config.assessor):
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


def one_line(error: BaseException) -> str:
    """The last line of an error's message (its type's name if it has none)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
