"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

Every file is written beside its target and renamed onto it, so a link standing at the target
is replaced by the new file and what it points to is never written (a run directory's
``config.yaml -> /elsewhere`` leaves ``/elsewhere`` as it was)."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp")  # what `replacing` names its temporary files (mkstemp)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`replacing` that a killed process left in
    ``directory`` (only for the directory's owner, when none of its writes is under way)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMPORARY.match(p.name) and (p.is_symlink() or p.is_file())]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def fresh_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a new file that has replaced ``path`` (a log, written while it grows): whatever
    stood at ``path``, a file or a link, is replaced, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    handle = os.fdopen(fd, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        handle.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    with handle:
        yield handle
