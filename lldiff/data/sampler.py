"""Shuffling samplers that a resumed run can fast-forward to where it stopped, and that
shard one global order over data-parallel ranks."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits the rows in ``randperm(n, seed + e)`` order.

    The order depends only on ``(seed, epoch)``, never on the global RNG or the objective,
    so MDM and AR runs with the same seed see identical batches. ``resume_at(epoch,
    skip)`` makes the next pass over ``epoch`` start after its first ``skip`` indices, so a
    run restored from a mid-epoch checkpoint continues with exactly the batches an
    uninterrupted run would have seen. Lightning calls ``set_epoch`` at each epoch start.

    With ``world_size > 1`` rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of that
    one global order (after the skip; every rank gets ``(n - skip) // W`` rows). With a
    per-rank batch ``b``, step ``k`` then trains on order positions ``[k b W, (k+1) b W)``
    across the ranks: exactly the rows one process with batch ``b W`` sees at step ``k``.
    """

    def __init__(self, num_rows: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start the next pass over ``epoch`` after ``skip`` positions of the global order
        (rows already trained on by all ranks together)."""
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
        rest = self.order(self.epoch)[skip:]
        per_rank = len(rest) // self.world_size
        yield from rest[self.rank : self.rank + per_rank * self.world_size : self.world_size].tolist()

    def __len__(self) -> int:
        return self.num_rows // self.world_size


class DataParallelShuffleSampler(ResumableShuffleSampler, DistributedSampler):
    """A :class:`ResumableShuffleSampler` that already shards over data-parallel ranks.

    Being a ``DistributedSampler``, Lightning leaves it as it is under DDP/FSDP instead of
    wrapping it in its ``DistributedSamplerWrapper`` (whose striding would not follow our
    epochs: the wrapper does not pass ``set_epoch`` on, nor a resume offset).
    """

    def __init__(self, num_rows: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        DistributedSampler.__init__(
            self, range(num_rows), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        ResumableShuffleSampler.__init__(self, num_rows, seed, rank=rank, world_size=world_size)
