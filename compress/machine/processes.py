"""Other processes: signals that stop this one, processes found and ended.

- `interrupting_signals()` / `deferred_signals()`: `kill` and a closed terminal stop an
  NNI experiment as Ctrl-C does; while its manager starts, all three wait.
- `environment_set()`: os.environ for a block (what a child process inherits).
- `tuners()` / `end()`: NNI's tuner processes of an experiment, and ending them.

Imports nothing of the pipeline's.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def interrupting_signals() -> Iterator[None]:
    """`kill` and a closed terminal raise KeyboardInterrupt, as Ctrl-C does: NNI's manager
    runs in a process group of its own and would outlive this process."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {number: signal.signal(number, interrupt)
                for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C, `kill` and a closed terminal wait until the block is done, then raise
    KeyboardInterrupt."""
    received = []
    numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def environment_set(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set (what NNI's manager inherits), restored after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tuners(working_directory: str) -> list[int]:
    """The process IDs of NNI tuners (`python -m nni --exp_params ...`) of the experiments in
    `working_directory` (read from /proc: none where there is no /proc)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(os.path.join("/proc", entry, "cmdline"), "rb") as file:
                words = file.read().decode(errors="replace").split("\0")
            parameters = json.loads(base64.b64decode(words[words.index("--exp_params") + 1]))
        except (OSError, ValueError, IndexError):  # not a tuner, or it just ended
            continue
        if parameters.get("experimentWorkingDirectory") == working_directory:
            found.append(int(entry))
    return found


def end(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM to each of `pids`, then SIGKILL to those alive after `grace` seconds."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}")
                    and not is_zombie(pid)]
            time.sleep(0.1)
        if not pids:
            return


def is_zombie(pid: int) -> bool:
    """Whether `pid` has ended and waits for its parent to read its status."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
