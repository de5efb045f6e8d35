"""Where a study lives, and the lock that lets several workers claim trials exactly.

Storage syntax (``--storage``):

- none given: ``sqlite:///OUT/study.db`` (SQLite: fine for a few workers on one machine)
- any SQLAlchemy RDB URL: ``sqlite:///PATH``, ``postgresql://USER:PASS@HOST/DB``,
  ``mysql+pymysql://...`` (the driver must be installed: psycopg2-binary, pymysql)
- ``journal:PATH``, or a bare ``PATH`` ending in ``.log`` / ``.journal``: Optuna's journal
  file (``JournalStorage`` + ``JournalFileBackend``), an append-only log that many
  workers on one machine or a shared filesystem can write without a database server

The storage is opened (and an RDB's tables created) here, so an unreachable database, a
missing driver or a bad path fails with a message naming it before any trial runs.
"""

from __future__ import annotations

import fcntl
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna

from lldiff.tune import TuneError

JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".log", ".journal")
CONNECT_TIMEOUT_S = 10  # a dead database host fails in seconds, not after the OS's TCP timeout
SQLITE_BUSY_TIMEOUT_S = 60  # several SQLite writers wait for the lock instead of failing
# drivers that take `connect_timeout` (others keep their own defaults)
_TIMEOUT_DRIVERS = {"postgresql", "postgresql+psycopg2", "postgresql+psycopg", "mysql", "mysql+pymysql", "mysql+mysqldb"}


@dataclass(frozen=True)
class StudyStorage:
    storage: optuna.storages.BaseStorage
    spec: str  # what another worker passes as --storage to join the same study
    label: str  # for messages and optuna-dashboard: the spec with any password hidden
    claim_lock: Path | None  # file the workers lock to claim trials (file-based storages only)


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def resolve_storage(spec: str | None, out: Path) -> StudyStorage:
    """Open the storage ``spec`` names (``None``: SQLite in ``out``); see the module docstring."""
    spec = default_storage(out) if spec is None else spec.strip()
    if spec.startswith(JOURNAL_PREFIX) or ("://" not in spec and spec.endswith(JOURNAL_SUFFIXES)):
        return _journal(spec[len(JOURNAL_PREFIX):] if spec.startswith(JOURNAL_PREFIX) else spec)
    if "://" in spec:
        return _rdb(spec)
    raise TuneError(
        f"unrecognised storage {spec!r}; allowed: an RDB URL (sqlite:///PATH, postgresql://USER@HOST/DB, "
        f"mysql+pymysql://...), journal:PATH, or a PATH ending in {' or '.join(JOURNAL_SUFFIXES)}"
    )


def _journal(path_text: str) -> StudyStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not path_text:
        raise TuneError("journal storage needs a path: journal:PATH")
    path = Path(path_text).expanduser().resolve()
    label = f"{JOURNAL_PREFIX}{path}"
    if not path.parent.is_dir():
        raise TuneError(f"journal storage {label!r}: directory {str(path.parent)!r} does not exist")
    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
    except Exception as error:  # noqa: BLE001 - re-raised with the path named
        raise TuneError(f"journal storage {label!r} cannot be opened: {type(error).__name__}: {error}") from None
    return StudyStorage(storage, label, label, Path(f"{path}.claim.lock"))


def hide_password(url: str) -> str:
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _rdb(url: str) -> StudyStorage:
    import sqlalchemy

    label = hide_password(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as error:  # noqa: BLE001
        raise TuneError(f"storage URL {label!r} is malformed: {error}") from None
    if parsed.drivername == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        database = parsed.database or ""
        lock = None if database in ("", ":memory:") else Path(f"{Path(database).resolve()}.claim.lock")
        if lock is not None and not lock.parent.is_dir():
            raise TuneError(f"storage {label!r} cannot be reached: directory {str(lock.parent)!r} does not exist")
    else:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.drivername in _TIMEOUT_DRIVERS else {}
        lock = None
    try:
        with claim_lock(lock):  # first opens of one SQLite file race to create its tables
            storage = _open_rdb(url, connect_args)
    except ImportError:
        raise TuneError(
            f"storage {label!r} cannot be reached: its database driver ({parsed.drivername}) is not installed "
            "(PostgreSQL: pip install psycopg2-binary; MySQL: pip install pymysql and use mysql+pymysql://)"
        ) from None
    except Exception as error:  # noqa: BLE001 - connection refused, unknown host, bad credentials, ...
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TuneError(f"storage {label!r} cannot be reached: {type(error).__name__}: {detail}") from None
    return StudyStorage(storage, url, label, lock)


def _open_rdb(url: str, connect_args: dict, attempts: int = 3) -> optuna.storages.BaseStorage:
    """``RDBStorage(url)``, retried when a concurrent worker created the schema first (``table
    ... already exists``, a duplicate schema version: a fresh database opened by several
    workers at once; SQLite is also serialised by the claim lock, a server database is not)."""
    import sqlalchemy
    from optuna.storages import RDBStorage

    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs={"connect_args": connect_args})
        except sqlalchemy.exc.DBAPIError as error:
            raced = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error).lower()
            if not raced or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def claim_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (no-op for ``None``).

    Workers count the study's trials and create the next one under this lock, so K workers
    on one filesystem create exactly ``n_trials`` between them. A server RDB has no such file:
    there two workers that check within the same few milliseconds may each start one.
    """
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
