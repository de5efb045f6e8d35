"""Text sources: where pre-training documents come from.

A *corpus* yields :class:`Document` objects (a provenance id and the text). Three kinds exist:

``stdlib`` (the default, works offline anywhere)
    The ``.py`` files of the running interpreter's standard library, one document per file.
``files``
    Local ``.txt`` / ``.jsonl`` / ``.parquet`` files, given as paths, globs or directories.
``hub``
    A Hugging Face Hub dataset loaded with :func:`datasets.load_dataset`.

Every corpus validates its arguments in its constructor (missing files, globs that match
nothing, empty files, unknown extensions) so mistakes surface before any tokenisation work,
and exposes :meth:`Corpus.fingerprint`, a cheap JSON-able description (paths, sizes,
mtimes, options) used as part of cache keys.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

SOURCES = ("stdlib", "files", "hub")
"""Allowed values of ``source``."""

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
"""File types understood by the ``files`` source."""

TXT_UNITS = ("paragraph", "file")
"""How a ``.txt`` file is cut into documents: at blank lines, or one document per file."""

STDLIB_DEFAULT_MAX_BYTES = 4_000_000
"""Default cap for the ``stdlib`` source: ~4 MB tokenises in a few seconds on 2 cores."""

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
)

# A paragraph break: a newline followed by one or more blank (whitespace-only) lines.
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")


@dataclass(frozen=True)
class Document:
    """One document: ``id`` names where it came from (``path#index``), ``text`` is its content."""

    id: str
    text: str


class Corpus(ABC):
    """An iterable source of documents with a cheap fingerprint for cache keys."""

    source: str = ""

    @abstractmethod
    def documents(self) -> Iterator[Document]:
        """Yield the documents in a deterministic order (empty/whitespace-only ones skipped)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """A JSON-serialisable description that changes whenever the documents may change."""

    def __iter__(self) -> Iterator[Document]:
        return self.documents()


def _cap_bytes(docs: Iterable[Document], max_bytes: Optional[int]) -> Iterator[Document]:
    """Yield documents in order until ``max_bytes`` UTF-8 bytes of text have been reached."""
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc.text.encode("utf-8"))
        yield doc


def _check_max_bytes(max_bytes: Optional[int]) -> None:
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes or None, got {max_bytes!r}")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def resolve_paths(paths: Sequence[str]) -> list[Path]:
    """Expand paths, globs and directories into a sorted, de-duplicated list of files.

    Raises ``FileNotFoundError`` naming the entry for a missing path or a glob that matches
    nothing, and ``ValueError`` for an unsupported extension or an empty file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    if not paths:
        raise ValueError("source='files' needs at least one entry in paths (files, globs or directories)")
    found: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"glob {entry!r} matched no files")
            candidates = [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(entry):
            candidates = sorted(p for p in Path(entry).rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
            if not candidates:
                raise FileNotFoundError(f"directory {entry!r} contains no {'/'.join(FILE_SUFFIXES)} files")
        elif os.path.isfile(entry):
            candidates = [Path(entry)]
        else:
            raise FileNotFoundError(f"data file {entry!r} does not exist")
        for path in candidates:
            if path.suffix not in FILE_SUFFIXES:
                raise ValueError(f"unsupported data file {str(path)!r}: allowed types are {', '.join(FILE_SUFFIXES)}")
            if path.stat().st_size == 0:
                raise ValueError(f"data file {str(path)!r} is empty")
            found.append(path.resolve())
    return sorted(set(found))


def _check_columns(path: Path, text_field: str) -> None:
    """Fail early if a .jsonl/.parquet file lacks ``text_field`` (cheap: schema / first line)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_field not in names:
            raise ValueError(f"parquet file {str(path)!r} has no column {text_field!r} (columns: {names})")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    record = _parse_json_line(path, lineno, line)
                    if text_field not in record:
                        raise ValueError(
                            f"jsonl file {str(path)!r} has no field {text_field!r} in its first record "
                            f"(fields: {sorted(record)})"
                        )
                    return


def _parse_json_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} line {lineno}: invalid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{str(path)!r} line {lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def split_paragraphs(text: str) -> list[str]:
    """Split text at blank lines; whitespace-only pieces are dropped, the rest kept verbatim."""
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


class FilesCorpus(Corpus):
    """Documents from local files.

    * ``.txt``: with ``txt_unit="paragraph"`` (default) each blank-line-separated paragraph is
      a document, so a single large file (e.g. a verse corpus) still gets a document-level
      train/val split; with ``txt_unit="file"`` each file is one document.
    * ``.jsonl``: one JSON object per line, text in ``text_field``.
    * ``.parquet``: text in column ``text_field``.

    Files are read in sorted path order; ``max_bytes`` keeps only the first documents up to
    that many bytes of text.
    """

    source = "files"

    def __init__(
        self,
        paths: Sequence[str],
        text_field: str = "text",
        txt_unit: str = "paragraph",
        max_bytes: Optional[int] = None,
    ) -> None:
        if txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        if not text_field:
            raise ValueError("text_field must be a non-empty field/column name")
        _check_max_bytes(max_bytes)
        self.paths = resolve_paths(paths)
        self.text_field = text_field
        self.txt_unit = txt_unit
        self.max_bytes = max_bytes
        for path in self.paths:
            _check_columns(path, text_field)

    def fingerprint(self) -> dict[str, Any]:
        files = []
        for p in self.paths:
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns])
        return {
            "source": self.source,
            "files": files,
            "text_field": self.text_field,
            "txt_unit": self.txt_unit,
            "max_bytes": self.max_bytes,
        }

    def documents(self) -> Iterator[Document]:
        return _cap_bytes(self._all_documents(), self.max_bytes)

    def _all_documents(self) -> Iterator[Document]:
        for path in self.paths:
            n = 0
            for doc in self._read(path):
                n += 1
                yield doc
            if n == 0:
                raise ValueError(f"data file {str(path)!r} contains no text (field/column {self.text_field!r})")

    def _read(self, path: Path) -> Iterator[Document]:
        if path.suffix == ".txt":
            text = _read_text(path)
            pieces = split_paragraphs(text) if self.txt_unit == "paragraph" else [text]
            for i, piece in enumerate(p for p in pieces if p.strip()):
                yield Document(f"{path}#{i}", piece)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = _parse_json_line(path, lineno, line)
                    if self.text_field not in record:
                        raise ValueError(f"{str(path)!r} line {lineno}: no field {self.text_field!r}")
                    text = record[self.text_field]
                    if not isinstance(text, str):
                        raise ValueError(
                            f"{str(path)!r} line {lineno}: field {self.text_field!r} is "
                            f"{type(text).__name__}, expected a string"
                        )
                    if text.strip():
                        yield Document(f"{path}#{lineno}", text)
        else:  # .parquet
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(path).iter_batches(columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    if isinstance(text, str) and text.strip():
                        yield Document(f"{path}#{row}", text)
                    row += 1


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not valid UTF-8 ({e})") from None


# --------------------------------------------------------------------------------------------
# stdlib
# --------------------------------------------------------------------------------------------


def _stable_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class StdlibCorpus(Corpus):
    """The running interpreter's standard-library ``.py`` files, one document per file.

    Excluded: ``site-packages``/``dist-packages``, test directories (``test``, ``tests``,
    ``idle_test``), ``__pycache__`` and the generated ``pydoc_data`` (a 750 kB string table).
    With ``max_bytes`` a deterministic pseudo-random subset of whole files is kept: files are
    visited in order of a hash of their relative path and taken while the total size stays
    within ``max_bytes`` (so the subset mixes many packages instead of being alphabetically
    first). Documents are yielded sorted by relative path.
    Undecodable files are skipped.
    """

    source = "stdlib"

    def __init__(self, max_bytes: Optional[int] = STDLIB_DEFAULT_MAX_BYTES, root: Optional[str] = None) -> None:
        _check_max_bytes(max_bytes)
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"standard library directory {str(self.root)!r} does not exist")
        self.max_bytes = max_bytes
        self.files = self._select()
        if not self.files:
            raise ValueError(f"no standard-library .py files found under {str(self.root)!r}")

    def _all_files(self) -> list[tuple[str, int, int]]:
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
            for name in filenames:
                if name.endswith(".py"):
                    path = Path(dirpath) / name
                    st = path.stat()
                    if st.st_size > 0:
                        files.append((path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns))
        return sorted(files)

    def _select(self) -> list[tuple[str, int, int]]:
        files = self._all_files()
        if self.max_bytes is None:
            return files
        chosen, total = [], 0
        for rel, size, mtime in sorted(files, key=lambda f: _stable_hash(f[0])):
            if total + size <= self.max_bytes:
                chosen.append((rel, size, mtime))
                total += size
        return sorted(chosen)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "python": sys.version,
            "root": str(self.root),
            "max_bytes": self.max_bytes,
            "files": [list(f) for f in self.files],
        }

    def documents(self) -> Iterator[Document]:
        for rel, _, _ in self.files:
            try:
                text = (self.root / rel).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield Document(rel, text)


# --------------------------------------------------------------------------------------------
# hub
# --------------------------------------------------------------------------------------------


class HubCorpus(Corpus):
    """A Hugging Face Hub dataset, via :func:`datasets.load_dataset(name, config, split=split)`.

    With ``max_bytes`` the dataset is streamed and only the first documents up to that many
    bytes are read (nothing else is downloaded). Needs network access (or a warm HF cache).
    The fingerprint is the dataset description only (name, config, split, field, revision),
    so a dataset that changes upstream needs a new ``revision`` or a fresh cache.
    """

    source = "hub"

    def __init__(
        self,
        name: Optional[str],
        config: Optional[str] = None,
        split: str = "train",
        text_field: str = "text",
        max_bytes: Optional[int] = None,
        revision: Optional[str] = None,
    ) -> None:
        if not name:
            raise ValueError("source='hub' needs hub_name (a Hugging Face dataset name, e.g. 'roneneldan/TinyStories')")
        if not split:
            raise ValueError("hub_split must be a non-empty split name, e.g. 'train'")
        if not text_field:
            raise ValueError("text_field must be a non-empty field/column name")
        _check_max_bytes(max_bytes)
        self.name, self.config, self.split = name, config, split
        self.text_field, self.max_bytes, self.revision = text_field, max_bytes, revision

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
            "max_bytes": self.max_bytes,
            "revision": self.revision,
        }

    def _load(self) -> Iterable[dict[str, Any]]:
        import datasets

        return datasets.load_dataset(
            self.name,
            self.config,
            split=self.split,
            revision=self.revision,
            streaming=self.max_bytes is not None,
        )

    def documents(self) -> Iterator[Document]:
        return _cap_bytes(self._all_documents(), self.max_bytes)

    def _all_documents(self) -> Iterator[Document]:
        where = f"hub dataset {self.name!r} (config={self.config!r}, split={self.split!r})"
        n = 0
        for i, record in enumerate(self._load()):
            if self.text_field not in record:
                raise ValueError(f"{where} has no field {self.text_field!r} (fields: {sorted(record)})")
            text = record[self.text_field]
            if isinstance(text, str) and text.strip():
                n += 1
                yield Document(f"hub:{self.name}/{self.config or ''}/{self.split}#{i}", text)
        if n == 0:
            raise ValueError(f"{where} contains no text in field {self.text_field!r}")


# --------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------


def build_corpus(
    source: str = "stdlib",
    *,
    paths: Optional[Sequence[str]] = None,
    text_field: str = "text",
    txt_unit: str = "paragraph",
    hub_name: Optional[str] = None,
    hub_config: Optional[str] = None,
    hub_split: str = "train",
    hub_revision: Optional[str] = None,
    max_bytes: Optional[int] = None,
) -> Corpus:
    """Build and validate the corpus for ``source`` (one of :data:`SOURCES`).

    ``max_bytes=None`` means the source's default: :data:`STDLIB_DEFAULT_MAX_BYTES` for
    ``stdlib``, no cap for ``files`` and ``hub``. Arguments that belong to another source are
    rejected rather than silently ignored.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if paths and source != "files":
        raise ValueError(f"paths={list(paths)!r} given but source={source!r}; set source='files' to read files")
    if hub_name and source != "hub":
        raise ValueError(f"hub_name={hub_name!r} given but source={source!r}; set source='hub' to use it")
    if source == "stdlib":
        return StdlibCorpus(max_bytes=STDLIB_DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    if source == "files":
        return FilesCorpus(paths or [], text_field=text_field, txt_unit=txt_unit, max_bytes=max_bytes)
    return HubCorpus(hub_name, hub_config, hub_split, text_field, max_bytes, hub_revision)
