"""Checks of what a user passes to a command (a device, text, a file to read or write), each
raising ``ValueError`` with one line that names the value and what is allowed, before any work.

The commands turn a ``ValueError`` into ``lldiff COMMAND: error: ...`` and exit code 2.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

DEVICES = "cpu, cuda, cuda:N, mps"


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if torch can run on it here; else a ValueError naming it and the devices this
    machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device!r} is not a device; allowed: {DEVICES}") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device!r}: this machine has no CUDA GPU (or torch is built without CUDA); "
                             "use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{flag} {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return device
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {device!r}: MPS is not available on this machine; use --device cpu")
        return device
    raise ValueError(f"{flag} {device!r}: lldiff runs on {DEVICES}")


def shown(text: str, limit: int = 40) -> str:
    """``text`` as a short Python literal (surrogates for undecodable bytes shown as ``\\udcff``)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_text(text: str, what: str) -> str:
    """``text`` if it is text a tokenizer can encode: UTF-8 (no undecodable bytes, which Python
    keeps as lone surrogates) and no NUL character (a binary file)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00 if 0xDC80 <= ord(text[error.start]) <= 0xDCFF else None
        at = f"byte 0x{byte:02x}" if byte is not None else f"character {text[error.start]!r}"
        raise ValueError(f"{what} {shown(text)} is not UTF-8 text ({at} at position {error.start}); "
                         "give UTF-8 text") from None
    if "\x00" in text:
        raise ValueError(f"{what} {shown(text)} holds a NUL character (binary data?); give UTF-8 text")
    return text


def read_lines(stream: TextIO | None, what: str) -> list[str]:
    """The non-blank lines of ``stream`` (stdin), each checked by :func:`check_text`; a closed or
    missing stdin is a ValueError."""
    if stream is None or getattr(stream, "closed", False):
        raise ValueError(f"no {what}s: stdin is closed; give them as arguments or as lines on stdin")
    try:
        lines = [line.rstrip("\n") for line in stream if line.strip()]
    except (OSError, ValueError) as error:  # a closed descriptor, a directory given as stdin
        raise ValueError(f"cannot read {what}s from stdin ({error}); give them as arguments") from None
    return [check_text(line, f"{what} on stdin line") for line in lines]


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of the file ``path`` (a ValueError naming it when it is missing, a
    directory, or binary)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}); is it a binary file?") from None
    if "\x00" in text:
        raise ValueError(f"{what} {str(path)!r} holds NUL bytes; is it a binary file?")
    return text


def read_yaml_file(path: str | os.PathLike, what: str, *, mapping: bool = True) -> Any:
    """The YAML document of ``path``, a mapping unless ``mapping=False``; every problem is a
    ValueError naming the file (and the line of a syntax error)."""
    import yaml

    text = read_text_file(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    if mapping and data is None:
        raise ValueError(f"{what} {str(path)!r} is empty; it must be a YAML mapping (key: value lines)")
    if mapping and not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must be a YAML mapping (key: value lines), "
                         f"not a {type(data).__name__}")
    return data


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, a file that could not be written at the end: an existing
    directory, a parent that is a file, a directory where nothing can be created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".lldiff-write-check.")
    except OSError as error:
        raise ValueError(f"{flag} {str(path)!r}: cannot write in {str(parent)!r} ({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_positive(value: float | None, flag: str, unit: str = "") -> None:
    """Refuse ``value`` unless it is a finite number > 0 (None: not given)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a number > 0{unit}, got {value}")
