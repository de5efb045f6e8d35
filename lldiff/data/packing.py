"""Packing token streams into fixed-length rows, and serving them as a torch Dataset.

Documents are encoded with an EOS after every document and concatenated in corpus order;
the stream is cut into rows of ``seq_len + 1`` tokens and the final partial row is dropped.
The extra token lets the AR objective shift inputs/targets while the MDM scores the last
``seq_len`` tokens, so both objectives are evaluated on exactly the same tokens. Rows are
stored as int32 ``.npy`` files and memory-mapped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


def pack_rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Reshape a 1-D token stream into ``(n_rows, seq_len + 1)`` int32, dropping the remainder."""
    check_seq_len(seq_len)
    width = seq_len + 1
    n_rows = len(stream) // width
    return np.ascontiguousarray(stream[: n_rows * width], dtype=np.int32).reshape(n_rows, width)


def join_documents(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate token lists with ``eos_id`` after every document (reference implementation)."""
    out: list[int] = []
    for ids in docs:
        out.extend(ids)
        out.append(eos_id)
    return np.asarray(out, dtype=np.int32)


def evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (all of them if ``k`` is None)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


class PackedRows(Dataset):
    """Rows of a packed ``(n, seq_len + 1)`` array, optionally restricted to ``indices``.

    Items are ``{"input_ids": LongTensor(seq_len + 1)}``.
    """

    def __init__(self, rows: np.ndarray, indices: Optional[np.ndarray] = None) -> None:
        if rows.ndim != 2:
            raise ValueError(f"packed rows must be 2-D (n, seq_len + 1), got shape {rows.shape}")
        self.rows = rows
        self.indices = indices

    def __len__(self) -> int:
        return len(self.rows) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.indices is not None:
            i = int(self.indices[i])
        return {"input_ids": torch.from_numpy(np.asarray(self.rows[i], dtype=np.int64))}

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1
