"""The cached preparation steps: tokenizer -> Arrow token cache -> packed rows.

Each ``ensure_*`` function returns the cache entry's location and whether it was a cache hit;
on a miss it builds the entry atomically (see :mod:`lldiff.data.cache`). They know nothing of
Lightning, so scripts and tests can call them directly.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .cache import atomic_directory, cache_key
from .corpora import Document
from .packing import pack_rows
from .tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def default_num_proc() -> int:
    """Tokenisation processes when none are requested: 1.

    A single process is the faster choice: ``encode_batch`` already runs on all cores through
    the Rust thread pool, whereas forked ``map`` workers must run single-threaded (default
    4 MB stdlib corpus on 2 cores: ~2.8 s with 1 process, ~3.3-5 s with 2). More processes
    only pay off when Python-side overhead dominates (very large corpora).
    """
    return 1


# -- tokenizer ----------------------------------------------------------------------------


def tokenizer_key(corpus_fingerprint: dict[str, Any], vocab_size: int, val_fraction: float) -> str:
    return cache_key("bpe", {"corpus": corpus_fingerprint, "vocab_size": vocab_size, "val_fraction": val_fraction})


def ensure_tokenizer(
    root: Path,
    key: str,
    vocab_size: int,
    train_texts: Callable[[], Sequence[str]],
) -> tuple[Tokenizer, Path, bool]:
    """Load ``tokenizers/<key>/tokenizer.json`` or train it on ``train_texts()`` and save it.

    Returns ``(tokenizer, path, hit)``. The file is written via temp file + rename, so this is
    safe to call from several processes at once.
    """
    path = root / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        log.info("tokenizer cache hit: %s", path)
        return Tokenizer.from_file(path), path, True
    texts = train_texts()
    log.info("training byte-level BPE (vocab_size=%d) on %d training documents", vocab_size, len(texts))
    tokenizer = train_tokenizer(texts, vocab_size, length=len(texts))
    tokenizer.save(path)
    return tokenizer, path, False


# -- token cache ----------------------------------------------------------------------------


def tokens_key(corpus_fingerprint: dict[str, Any], tokenizer: Tokenizer, val_fraction: float) -> str:
    return cache_key(
        "tok", {"corpus": corpus_fingerprint, "tokenizer": tokenizer.fingerprint, "val_fraction": val_fraction}
    )


class _EncodeWithEos:
    """Picklable batched map function: text -> token ids with EOS appended to every document."""

    def __init__(self, tokenizer_json: str) -> None:
        self.tokenizer_json = tokenizer_json
        self._tokenizer: Optional[Tokenizer] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "_tokenizer": None}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        eos = self._tokenizer.eos_id
        return {"input_ids": [ids + [eos] for ids in self._tokenizer.encode_batch(batch["text"])]}


@contextmanager
def _tokenizers_fork_safe(num_proc: int) -> Iterator[None]:
    """Silence the 'process just got forked' warning of ``tokenizers`` while map() forks.

    Forked workers must run single-threaded anyway; the user's own setting is respected.
    """
    if num_proc <= 1 or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def ensure_tokens(
    root: Path,
    key: str,
    documents: Callable[[], tuple[Sequence[Document], Sequence[Document]]],
    tokenizer: Tokenizer,
    num_proc: Optional[int] = None,
) -> tuple[Path, bool]:
    """Load or build the Arrow token cache ``tokens/<key>/{train,val}``.

    ``documents()`` returns the (train, val) documents; it is only called on a cache miss.
    Tokenisation runs through ``datasets.Dataset.map(batched=True, num_proc=...)``; each row
    holds a document's ``id`` and its ``input_ids`` (int32, EOS appended).
    """
    target = root / "tokens" / key
    if target.is_dir():
        log.info("token cache hit: %s", target)
        return target, True
    import datasets

    num_proc = num_proc or default_num_proc()
    encode = _EncodeWithEos(tokenizer.to_json())
    features = datasets.Features(
        {"id": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32"))}
    )
    train, val = documents()
    with atomic_directory(target) as tmp, _tokenizers_fork_safe(num_proc):
        for name, docs in zip(SPLITS, (train, val)):
            ds = datasets.Dataset.from_dict({"id": [d.id for d in docs], "text": [d.text for d in docs]})
            procs = min(num_proc, len(ds))
            ds = ds.map(
                encode,
                batched=True,
                batch_size=256,
                num_proc=procs if procs > 1 else None,
                remove_columns=["text"],
                features=features,
                new_fingerprint=f"{key}-{name}",
                desc=f"tokenising {name}",
            )
            ds.save_to_disk(str(tmp / name))
    log.info("token cache built: %s", target)
    return target, False


def token_stream(tokens_dir: Path) -> np.ndarray:
    """The concatenated int32 token stream (documents in corpus order, EOS-terminated)."""
    import datasets
    import pyarrow.compute as pc

    ds = datasets.load_from_disk(str(tokens_dir))
    column = ds.data.column("input_ids")
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


# -- packed rows ------------------------------------------------------------------------------


def rows_key(tokens_key_: str, seq_len: int) -> str:
    return cache_key("rows", {"tokens": tokens_key_, "seq_len": seq_len})


def ensure_rows(root: Path, key: str, tokens_dir: Path, seq_len: int) -> tuple[Path, bool]:
    """Load or build ``rows/<key>/{train,val}.npy``: int32 arrays of shape (n, seq_len + 1).

    Raises ``ValueError`` if a split is too small to fill a single row.
    """
    target = root / "rows" / key
    if target.is_dir():
        log.info("packed rows cache hit: %s", target)
        return target, True
    meta: dict[str, Any] = {"seq_len": seq_len}
    packed = {}
    for name in SPLITS:
        stream = token_stream(tokens_dir / name)
        rows = pack_rows(stream, seq_len)
        if len(rows) == 0:
            raise ValueError(
                f"the {name} split has only {len(stream)} tokens, fewer than one row of seq_len + 1 = "
                f"{seq_len + 1}; use a smaller seq_len, a larger val_fraction, or more text"
            )
        packed[name] = rows
        meta[name] = {"tokens": int(len(stream)), "rows": int(len(rows))}
    with atomic_directory(target) as tmp:
        for name, rows in packed.items():
            np.save(tmp / f"{name}.npy", rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("packed rows built: %s (%s)", target, meta)
    return target, False


def load_rows(rows_dir: Path) -> dict[str, np.ndarray]:
    """Memory-map the packed ``{train,val}.npy`` arrays of a rows cache entry."""
    return {name: np.load(rows_dir / f"{name}.npy", mmap_mode="r") for name in SPLITS}


def load_meta(rows_dir: Path) -> dict[str, Any]:
    return json.loads((rows_dir / "meta.json").read_text())
