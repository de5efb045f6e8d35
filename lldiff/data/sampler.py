"""A shuffling sampler that a resumed run can fast-forward to where it stopped."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits the rows in ``randperm(n, seed + e)`` order.

    The order depends only on ``(seed, epoch)``, never on the global RNG or the objective,
    so MDM and AR runs with the same seed see identical batches. ``resume_at(epoch,
    skip)`` makes the next pass over ``epoch`` start after its first ``skip`` indices, so a
    run restored from a mid-epoch checkpoint continues with exactly the batches an
    uninterrupted run would have seen. Lightning calls ``set_epoch`` at each epoch start.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        if not 0 <= skip <= self.num_rows:
            raise ValueError(f"cannot skip {skip} of {self.num_rows} rows")
        self.epoch = epoch
        self._resume = (epoch, skip)

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        yield from self.order(self.epoch)[skip:].tolist()

    def __len__(self) -> int:
        return self.num_rows
