"""Deterministic document-level train/validation split.

A document goes to validation iff a hash of its TEXT, mapped to [0, 1), is below
``val_fraction``. The rule depends on nothing but the document itself: it is independent of
the training seed, the objective, the tokenizer and the other documents, so every run on the
same corpus validates on the same documents, and exact duplicates always land on the same side
(no train/val leakage through repeated paragraphs). If no document falls below the threshold
(tiny corpora), the document with the smallest hash is moved to validation.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from .corpora import Document

SPLIT_SALT = b"lldiff-split-v1"


def split_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the document text."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") / 2**64


def check_val_fraction(val_fraction: float) -> None:
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")


def split_documents(docs: Iterable[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val), each keeping the corpus order.

    Raises ``ValueError`` if there are fewer than two documents or either side ends up empty.
    """
    check_val_fraction(val_fraction)
    docs = list(docs)
    if len(docs) < 2:
        raise ValueError(
            f"the corpus has {len(docs)} document(s); a document-level train/val split needs at least 2 "
            f"(for a single .txt file, separate documents with blank lines)"
        )
    scores = [split_score(d.text) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        lowest = min(scores)
        is_val = [s == lowest for s in scores]  # duplicates of that text move together
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    if not train:
        raise ValueError(
            f"all {len(docs)} documents fell into validation (val_fraction={val_fraction}); "
            f"use a smaller val_fraction or more distinct documents"
        )
    return train, val


def describe_split(train: Sequence[Document], val: Sequence[Document]) -> str:
    tb = sum(len(d.text.encode("utf-8")) for d in train)
    vb = sum(len(d.text.encode("utf-8")) for d in val)
    return f"{len(train)} train docs ({tb:,} bytes), {len(val)} val docs ({vb:,} bytes)"
