"""What the machine allows: room on disk and in memory, folders we may write, one run per
output.

- `check_room()`: refuse, before a long run, files of a known size that will not fit;
  `DiskFull` says which file, how much it needed and how much was free.
- `disk_full()`: a full disk met while writing (ENOSPC, also inside torch's and ONNX's
  writers' own errors) as DiskFull.
- `check_writable()`: refuse, before any work, a folder we cannot create files in (a
  read-only mount, no permission): found by trying, as root passes every permission test.
- `check_memory()`: refuse, before decoding, what will not fit in memory (--cache).
- `output_lock()`: one run at a time writes an output; a killed run frees it (flock).

Imports nothing of the pipeline's but cli.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator

from compress.cli import UserError, is_disk_full

# room left on top of an estimate (a history, a figure, the filesystem's own blocks)
MARGIN = 1.1
SLACK_BYTES = 4 * 2 ** 20


def megabytes(count: float) -> str:
    """A size as people read it: 3.2 MB, 1.4 GB."""
    if count >= 2 ** 30:
        return f"{count / 2 ** 30:.1f} GB"
    return f"{count / 2 ** 20:.1f} MB"


class DiskFull(UserError):
    """A file that could not be written for want of room: which, how much, how much free."""

    def __init__(self, path: str, needed: float | None, free: int, written: int = 0,
                 kept: str = ""):
        self.path = path
        if needed:
            need = f"about {megabytes(needed)}"
        else:  # what went out before the disk filled: at least that
            need = f"more than {megabytes(written)}" if written else "room"
        super().__init__(f"{path}: cannot be written, the disk is full: it needs {need}, "
                         f"{megabytes(free)} free in {existing_folder(path)}"
                         + (f"; {kept}" if kept else ""))


def existing_folder(path: str) -> str:
    """The nearest folder of `path` (itself, or its parents) that exists."""
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def free_bytes(path: str) -> int:
    """Room left, for this user, on the filesystem that holds (or would hold) `path`."""
    return shutil.disk_usage(existing_folder(path)).free


def check_room(path: str, needed: float, what: str) -> None:
    """UserError now, before any work, unless about `needed` bytes (`what` they are) fit
    beside `path`, with a margin."""
    free = free_bytes(path)
    needed = needed * MARGIN + SLACK_BYTES
    if needed > free:
        raise UserError(f"{path}: needs about {megabytes(needed)} for {what}, and "
                        f"{existing_folder(path)} has {megabytes(free)} free; nothing was "
                        "started: make room, or write elsewhere")


@contextlib.contextmanager
def disk_full(path: str, needed: float | None = None, kept: str = "",
              written: str | None = None, free: int | None = None) -> Iterator[None]:
    """A full disk met in the block, writing `path` (about `needed` bytes; `written` a file
    whose size shows how far it got), as DiskFull; `kept` says what is left as it was,
    `free` what was free before (else: now)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        size = os.path.getsize(written) if written and os.path.isfile(written) else 0
        raise DiskFull(path, needed, free_bytes(path) if free is None else free, size,
                       kept) from None


def check_writable(path: str, flag: str, folder: bool = False) -> None:
    """UserError now, before any work, unless files can be created where `path` goes: its
    folder (made if missing, and removed again), or with `folder` `path` itself."""
    folder = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    made = []
    probe = folder
    while not os.path.isdir(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write in {existing_folder(folder)} "
                        f"({error.strerror}); nothing was started") from None
    finally:
        for folder_made in made:  # leave no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder_made)


def available_memory() -> int | None:
    """Memory this machine can still give, in bytes (MemAvailable, as `free` shows it), or
    None where it does not say (no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed: float, what: str, flag: str, available: int | None = None) -> None:
    """UserError now, before the work, if `needed` bytes (of `what`) exceed the memory
    available (`available`, else available_memory())."""
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise UserError(f"{flag}: {what} would take about {megabytes(needed)} of memory, and "
                        f"this machine has {megabytes(available)} available; leave {flag} out "
                        "(pictures are then decoded each epoch) or use fewer/smaller pictures")


def is_first_process() -> bool:
    """The process that writes the outputs: rank 0 under torchrun, else this one."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def output_lock(path: str, flag: str, folder: bool = False) -> Iterator[None]:
    """Hold the lock of `path` (a file, or with `folder` a folder its run writes in) while
    the block runs: a second run writing it is refused in one line. The lock is the
    kernel's (flock on .NAME.lock beside the file, .lock in the folder): a killed run holds
    it no more. Taken by the first process only (under torchrun the others write nothing);
    the lock file, and a folder made for it and left empty, go at the end."""
    if not is_first_process():
        yield
        return
    where = path if folder else os.path.dirname(os.path.abspath(path))
    made = not os.path.isdir(where)
    os.makedirs(where, exist_ok=True)
    lock_path = os.path.join(where, ".lock" if folder else f".{os.path.basename(path)}.lock")
    try:
        with open(lock_path, "a+") as lock:
            take(lock, lock_path, path, flag)
            try:
                yield
            finally:
                os.remove(lock_path)  # (still held: whoever opens it next makes a new one)
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(where)  # only if empty


def take(lock: typing.IO[str], lock_path: str, path: str, flag: str) -> None:
    """flock `lock` (the open file `lock_path`) for this process, or a UserError naming the
    process that holds it."""
    import fcntl

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # (a run ending removes its lock file: one opened just before is another's)
        if not os.path.exists(lock_path) or \
                os.stat(lock_path).st_ino != os.fstat(lock.fileno()).st_ino:
            raise BlockingIOError(errno.EAGAIN, "taken meanwhile")
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise UserError(f"{flag} {path}: another run ({holder}) is writing it now; wait "
                        f"until it ends, or give another {flag}") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()}")
    lock.flush()
