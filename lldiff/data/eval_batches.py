"""Validation and test batches that give the same metric on any number of processes.

A validation set of ``n`` rows is cut into the batches one process would see, ``[0, b)``,
``[b, 2b)``, ... (the last one possibly short), and those whole batches are dealt to the
data-parallel ranks in turn: rank ``r`` of ``W`` takes batches ``r, r + W, ...``. Every batch
carries its index in that one global sequence (``eval_batch``), so the Monte-Carlo draws
seeded by it (:meth:`lldiff.modules.MaskedDiffusionLM.validation_draws`) are those of one
process, and a per-row weight (``eval_weight``). Ranks with fewer batches run copies of batch
0 with weight 0 (every rank must run as many forward passes as the others: FSDP2 gathers the
weights in each), so no row counts twice, as it did under Lightning's padding
``DistributedSampler``. The sums of nats, tokens and bytes are then those of one process, up to
the order of floating-point additions.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data import default_collate

WEIGHT_KEY = "eval_weight"
BATCH_KEY = "eval_batch"


class EvalBatches(Dataset):
    """The global batches of ``items`` (``batch_size`` rows each, the last one possibly
    short): item ``(k, weight)`` is batch ``k`` collated, plus ``eval_batch = k`` and a float
    ``eval_weight`` of ``weight`` per row."""

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any] = default_collate):
        self.items = items
        self.batch_size = batch_size
        self.collate = collate

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, key: tuple[int, float]) -> dict[str, Any]:
        k, weight = key
        rows = range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.items)))
        batch = dict(self.collate([self.items[i] for i in rows]))
        batch[WEIGHT_KEY] = torch.full((len(rows),), float(weight))
        batch[BATCH_KEY] = k
        return batch


class EvalBatchSampler(DistributedSampler):
    """Rank ``rank``'s share of ``num_batches`` global batches: ``(k, 1.0)`` for batches
    ``rank, rank + world_size, ...``, then ``(0, 0.0)`` until every rank has
    ``ceil(num_batches / world_size)`` of them. A ``DistributedSampler``, so Lightning uses it
    as it is instead of replacing it with its own padding one."""

    def __init__(self, num_batches: int, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        super().__init__(range(num_batches), num_replicas=world_size, rank=rank, shuffle=False)
        self.num_batches = num_batches
        self.per_rank = math.ceil(num_batches / world_size)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        mine = list(range(self.rank, self.num_batches, self.num_replicas))
        yield from ((k, 1.0) for k in mine)
        yield from ((0, 0.0) for _ in range(self.per_rank - len(mine)))

    def __len__(self) -> int:
        return self.per_rank


def eval_loader(items: Sequence[Any], batch_size: int, *, rank: int = 0, world_size: int = 1,
                collate: Callable[[list[Any]], Any] = default_collate, **loader_kwargs: Any) -> DataLoader:
    """A validation/test ``DataLoader`` of whole global batches (see the module docstring)."""
    batches = EvalBatches(items, batch_size, collate)
    sampler = EvalBatchSampler(len(batches), rank=rank, world_size=world_size)
    return DataLoader(batches, batch_size=None, sampler=sampler, **loader_kwargs)


def eval_weights(batch: dict[str, Any], rows: int, device: torch.device) -> Tensor:
    """The per-row weights of an evaluation batch (1 for every row of a batch without them)."""
    weight = batch.get(WEIGHT_KEY)
    return torch.ones(rows, device=device) if weight is None else weight


def eval_batch_index(batch: dict[str, Any], batch_idx: int) -> int:
    """The batch's index in the one-process order (``batch_idx`` for a batch without one)."""
    index = batch.get(BATCH_KEY)
    return batch_idx if index is None else int(index)
