"""On-disk cache plumbing: where caches live, how keys are made, how entries are published.

Layout under the cache root (``cache_dir`` argument, else ``$LLDIFF_CACHE``, else
``data/cache`` relative to the working directory)::

    tokenizers/<key>/tokenizer.json     trained tokenizer   (corpus + vocab_size + split)
    tokens/<key>/{train,val}/           Arrow token cache   (corpus + tokenizer + split)
    rows/<key>/{train,val}.npy          packed int32 rows   (tokens key + seq_len)

Every entry is written into a private temporary sibling and renamed into place with
``os.replace``, so readers never see partial entries and concurrent writers (several DDP
processes, parallel jobs) are safe: the loser of a race discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

CACHE_ENV = "LLDIFF_CACHE"
DEFAULT_CACHE_DIR = "data/cache"
CACHE_VERSION = 2  # bump when the on-disk format or the pipeline semantics change (2: vocab_size = real V)


def cache_root(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$LLDIFF_CACHE``, else ``./data/cache``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser().absolute()


def cache_key(prefix: str, payload: Any) -> str:
    """``<prefix>-<16 hex digits>`` from the SHA-256 of the canonical JSON of ``payload``."""
    blob = json.dumps({"v": CACHE_VERSION, "payload": payload}, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:16]}"


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that is renamed to ``final`` on success.

    If ``final`` appeared meanwhile (another process won the race), the temporary copy is
    discarded. On error the temporary directory is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
