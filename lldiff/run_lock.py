"""One process at a time owns a run directory (a fit) or a sweep directory.

Two fits on one run directory would interleave their ``config.yaml``, checkpoints and event
files; two sweeps on one ``--out`` would train every run twice. :func:`owning` takes an
advisory lock (``flock``) on a hidden file in the directory for as long as the work lasts; the
operating system drops it when the process ends, killed or not, so a crash never leaves a
directory locked. A second process is refused at once with the holder's pid and host.

A distributed job takes one lock: only its first process (global rank 0, or the launching
process before Lightning starts the others) locks; the other ranks of the same job, which
Lightning or torchrun start with their rank in the environment, do not.

Several ``lldiff sweep run --only RUN`` jobs on one ``--out`` (a SLURM array, parallel
torchrun launches) share the sweep directory (``shared=True``); each run's own directory then
keeps two jobs off one run. A full sweep owns the directory alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".lldiff.lock"
GLOBAL_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # torchrun, SLURM, LSF
LAUNCHED_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK")  # Lightning's launcher, torchrun's node


class DirectoryInUseError(ValueError):
    """Another process owns the directory (a user's mistake to correct: one line, exit 2)."""


def is_first_process() -> bool:
    """Whether this process is the first of its job (or not part of a distributed job)."""
    for name in GLOBAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value == "0"
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in LAUNCHED_RANK_VARIABLES)


def _holder(lock: Path) -> str:
    """The process named last in the lock file that still runs (a shared lock's holders each
    append their line)."""
    try:
        lines = [line.split() for line in lock.read_text().splitlines() if len(line.split()) == 2]
    except OSError:
        lines = []
    here = socket.gethostname()
    for pid, host in reversed(lines):
        if host != here:
            return f"pid {pid} on {host}"
        if pid.isdigit() and _running(int(pid)):
            return f"pid {pid}"
    return "another process"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_lock_file(path: str | os.PathLike) -> int:
    """A file descriptor of the lock file ``path``, created if missing, never truncated and
    never opened through a link (a link standing there is replaced by the file)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        os.unlink(path)
        return os.open(path, flags, 0o644)


@contextmanager
def owning(directory: str | os.PathLike, what: str = "run directory", *, shared: bool = False,
           hint: str = "wait for it to end, or use another directory") -> Iterator[Path | None]:
    """Hold ``directory``'s lock (creating the directory) for the ``with`` block; yields the
    lock file (None on the other ranks of a distributed job, which take no lock).

    Raises :class:`DirectoryInUseError` (nothing written) when another process holds it."""
    if not is_first_process():
        yield None
        return
    directory = Path(directory)
    lock = directory / LOCK_FILE
    directory.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(lock)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryInUseError(f"{what} {directory} is in use by {_holder(lock)}; {hint}") from None
        line = f"{os.getpid()} {socket.gethostname()}\n".encode()
        if shared:
            os.lseek(fd, 0, os.SEEK_END)
        else:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, line)
        yield lock
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would let two processes lock two files)



@contextmanager
def owning_run(trainer: Any, log_dir: str | None) -> Iterator[None]:
    """A fit's hold on its run directory ``log_dir`` (None: nothing to hold). The owner first
    removes what killed writes of this run left behind: checkpoint staging files in the
    checkpoint directories and temporary files of the run's own files (nothing else, and
    nowhere else)."""
    if log_dir is None:
        yield
        return
    hint = "wait for that fit to end, or start this one under another name (--trainer.logger.init_args.name NAME)"
    with owning(log_dir, "run directory", hint=hint) as lock:
        if lock is not None:
            _remove_stale_files(trainer, Path(log_dir))
        yield


def _remove_stale_files(trainer: Any, log_dir: Path) -> None:
    from lldiff.atomic import remove_stale_temporaries
    from lldiff.checkpoint_io import remove_stale_staging

    directories = {log_dir, log_dir / "checkpoints"}
    directories |= {Path(c.dirpath) for c in getattr(trainer, "checkpoint_callbacks", []) if getattr(c, "dirpath", None)}
    removed = [p for d in sorted(directories) for p in (*remove_stale_staging(d), *remove_stale_temporaries(d))]
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        print(f"lldiff: removed {len(removed)} file(s) left by interrupted writes of this run ({names})",
              file=sys.stderr)
