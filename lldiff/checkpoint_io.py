"""How checkpoints reach the disk and come back: never half-written, never running code.

Writing. Lightning's ``TorchCheckpointIO`` stages a checkpoint in ``$TMPDIR`` and moves it
onto ``last.ckpt``; when ``$TMPDIR`` is another filesystem (tmpfs, a node-local ``/tmp``)
that move is a copy, and a kill or a full disk during it leaves a truncated ``last.ckpt``
with the previous one already gone. Here every checkpoint is written *beside* its target,
flushed and fsynced, then renamed onto it, so the old checkpoint stays valid until the new
one is complete:

* :func:`write_file_atomically` does it for full ``.ckpt`` files (single device, DDP,
  ``fsdp2_full``), through :class:`lldiff.callbacks.AtomicCheckpointIO`, which the CLI
  installs on every trainer's strategy;
* :func:`replace_directory` does it for sharded (DCP) checkpoint directories: every rank
  writes into one staging directory, then it is exchanged with the target in one rename
  (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, with the previous
  checkpoint kept beside the target until the new one is in place).

Reading. A full checkpoint is read with ``torch.load(weights_only=True)``. A sharded
directory's ``.metadata`` index is a plain pickle, which PyTorch's own reader loads with
``pickle.load`` (a crafted one runs code); :func:`check_sharded_metadata` and
:class:`SafeFileSystemReader` read it with an unpickler that only builds the classes a DCP
index is made of (its dataclasses, dtypes, ``torch.Size``, paths) and refuses anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import io
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

STAGING_SUFFIX = ".partial"  # never matches Lightning's `last*.ckpt` lookup: names start with "."


class UnsafeCheckpointError(ValueError):
    """A checkpoint asks to build an object that loading a checkpoint never needs."""


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (``errno`` ENOSPC or EDQUOT); the
    previous one is kept. Its message is one line (``lldiff`` prints it without a traceback)."""

    def __str__(self) -> str:
        return str(self.strerror)


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def no_space(error: BaseException | None) -> int | None:
    """The errno if ``error`` (or what caused it) is a full disk or quota, else None:
    ``torch.save`` reports a failed write of its file handle as a RuntimeError whose context
    is the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error.errno
        for failure in (getattr(error, "failures", None) or {}).values():  # DCP's CheckpointException, per rank
            code = no_space(failure[0] if isinstance(failure, tuple) else failure)
            if code is not None:
                return code
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(target: Path, code: int, written: int | None = None) -> DiskFullError:
    """One line for a checkpoint write that ran out of space: the path, what was written of it
    before the disk filled, the space left (the staging data removed) and what is kept."""
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    part = "" if not written else f" after {written / 2**20:.1f} MiB of it"
    kept = ("the previous checkpoint is kept. Free some space, then resume with --ckpt_path last"
            if os.path.lexists(target) else "there is no earlier checkpoint. Free some space and run it again")
    return DiskFullError(code, f"checkpoint {target} not written: {_NO_SPACE[code]}{part} ({free} on "
                               f"{target.parent}); {kept}")


def is_local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def staging_path(target: Path, tag: str = "") -> Path:
    """A hidden name beside ``target`` on the same filesystem (``tag`` makes it unique)."""
    return target.parent / f".{target.name}{'.' + tag if tag else ''}{STAGING_SUFFIX}"


def write_file_atomically(target: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(handle)`` on a staging file beside ``target``, fsync it, rename it onto
    ``target``. On any failure (a full disk, an exception) the staging file is removed and
    ``target`` is untouched; a kill leaves at most a hidden staging file behind."""
    target = _local(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target, uuid.uuid4().hex[:8])
    try:
        with open(staging, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except BaseException as error:
        code = no_space(error)
        written = staging.stat().st_size if code is not None and staging.exists() else None
        staging.unlink(missing_ok=True)
        if code is not None:
            raise disk_full_error(target, code, written) from None
        raise
    fsync_directory(target.parent)
    return target


def remove_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove the staging files and directories that killed writes left in ``directory``
    (hidden ``.NAME[.TAG].partial``); a previous sharded checkpoint that an interrupted swap had
    set aside is put back first. Only for the owner of a run, at its start: no write of the run
    is under way then (:mod:`lldiff.run_lock`). Returns what was removed."""
    directory = _local(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if not (name.startswith(".") and name.endswith(STAGING_SUFFIX)):
            continue
        previous = ".previous" + STAGING_SUFFIX
        if name.endswith(previous) and len(name) > len(previous) + 1:
            recover_directory(directory / name[1:-len(previous)])
            if not os.path.lexists(path):
                continue
        remove_path(path)
        removed.append(path)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- sharded directories ---------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL/ENOSYS (filesystem or kernel without it): fall back


def recover_directory(target: Path) -> None:
    """Finish a swap that a kill interrupted in the two-rename fallback: if ``target`` is
    missing but the previous checkpoint was set aside, put it back."""
    previous = staging_path(target, "previous")
    if not target.exists() and previous.is_dir():
        os.replace(previous, target)


def publish_directory(staging: Path, target: Path) -> None:
    """Make the complete directory ``staging`` become ``target`` (replacing an old one)."""
    for file in staging.rglob("*"):
        if file.is_file():  # DCP syncs its shards; meta.pt and the index are plain writes
            _fsync_file(file)
    fsync_directory(staging)
    if target.is_file():
        target.unlink()
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        remove_path(staging)  # now holds the previous checkpoint (or the link that stood there)
    else:
        previous = staging_path(target, "previous")
        remove_path(previous)
        os.replace(target, previous)
        os.replace(staging, target)
        remove_path(previous)
    fsync_directory(target.parent)


@contextmanager
def replace_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Single-process form: yield an empty staging directory beside ``target``; when the
    block ends without error it replaces ``target``. Multi-process writers use
    :func:`staging_path` (the same name on every rank) and :func:`publish_directory` on one
    rank after a barrier."""
    target = _local(target)
    recover_directory(target)
    staging = staging_path(target)
    remove_path(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, target)


# -- safe reading of a DCP index ---------------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATH_CLASSES = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}
_SERIALIZATION_HELPERS = {"_get_layout", "_MEM_FORMAT_ENCODING"}


class _IndexUnpickler(pickle.Unpickler):
    """Builds only what a DCP ``.metadata`` index holds; anything else is refused."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module == "torch.serialization" and name in _SERIALIZATION_HELPERS:
            return getattr(torch.serialization, name)
        elif module == "pathlib" and name in _PATH_CLASSES:
            import pathlib

            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it asks to build {module}.{name}, which a checkpoint index never "
            "holds (a pickle that names it can run code). Only load sharded checkpoints written by lldiff fit."
        )


def load_sharded_metadata(directory: str | os.PathLike) -> Any:
    """The ``.metadata`` index of a DCP directory, read without running code, after checking
    that its byte entries hold no code either (:func:`check_byte_entries`)."""
    path = _local(directory) / ".metadata"
    with open(path, "rb") as handle:
        try:
            metadata = _IndexUnpickler(handle, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # truncated or not a pickle at all
            raise ValueError(f"{path} is not a readable checkpoint index ({type(error).__name__}: {error})") from None
    check_byte_entries(_local(directory), metadata)
    return metadata


def check_sharded_metadata(directory: str | os.PathLike) -> None:
    """Raise :class:`UnsafeCheckpointError` unless the directory's index is a plain DCP index
    and its byte entries are plain data."""
    load_sharded_metadata(directory)


def check_byte_entries(directory: Path, metadata: Any) -> None:
    """Refuse a DCP directory whose byte entries could run code when loaded.

    DCP saves what is not a tensor as a "byte entry" (``BytesStorageMetadata``): a
    ``torch.save`` of the object, which PyTorch's ``DefaultLoadPlanner.load_bytes`` reads back
    with ``weights_only=False`` (so a crafted entry runs code). lldiff's own sharded
    checkpoints hold byte entries only for the optimizer's ``param_groups`` (floats, tuples,
    names): an entry of the weights (``state_dict.*``) stored as bytes is refused, and every
    other one must load with ``weights_only=True`` (the same bytes then build the same plain
    data in PyTorch's reader). Its file must lie in the directory and carry no storage
    transforms (lldiff writes none)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    entries = {name for name, md in getattr(metadata, "state_dict_metadata", {}).items()
               if isinstance(md, BytesStorageMetadata)}
    if not entries:
        return
    root = directory.resolve()
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        name = getattr(index, "fqn", None)
        if name not in entries:
            continue
        file = str(getattr(info, "relative_path", ""))
        where = f"refusing to load {directory}: its entry {name!r} (in {file})"
        if name.startswith("state_dict."):
            raise UnsafeCheckpointError(f"{where} is a pickled object, not a tensor; lldiff's checkpoints store "
                                        "weights as tensors only (a pickled entry can run code)")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{where} is stored with transforms {list(info.transform_descriptors)}, "
                                        "which lldiff never writes")
        path = (root / file).resolve()
        if path.parent != root or not path.is_file():
            raise UnsafeCheckpointError(f"{where} names a file outside the checkpoint directory or a missing one")
        with open(path, "rb") as handle:
            handle.seek(int(info.offset))
            data = handle.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as error:  # noqa: BLE001 - any refusal or corruption: not plain data
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UnsafeCheckpointError(f"{where} is not plain data ({first}); a pickled object can run code") from None


def safe_filesystem_reader(directory: str | os.PathLike) -> Any:
    """A DCP ``FileSystemReader`` whose ``read_metadata`` uses the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = load_sharded_metadata(directory)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(_local(directory))
