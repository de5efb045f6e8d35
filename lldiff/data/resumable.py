"""What every lldiff DataModule shares: a training order seeded per epoch, sharded over
data-parallel ranks and saved in checkpoints (a resumed run continues exactly), and the
tokenizer facts the modules read (:class:`TokenizedDataModule`)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from .sampler import DataParallelShuffleSampler


def data_parallel_rank(trainer: Optional[pl.Trainer]) -> tuple[int, int]:
    """(rank, size) of this process in the data-parallel group: (0, 1) without a trainer or
    a distributed strategy (DDP, FSDP2 and the like report theirs)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 0, 1
    return int(kwargs["rank"]), int(kwargs["num_replicas"])


class ResumableOrder:
    """Mixin for a ``LightningDataModule`` with ``seed`` and ``batch_size`` (per process).

    :meth:`train_sampler` gives this rank's share of the epoch's ``randperm(seed + epoch)``
    order, fast-forwarded after a restore; :meth:`state_dict` (saved by Lightning in every
    checkpoint) records how many rows of the epoch all ranks together have trained on.
    """

    seed: int
    batch_size: int
    _resume_state: Optional[dict[str, Any]] = None

    def train_sampler(self, num_rows: int) -> DataParallelShuffleSampler:
        rank, world = data_parallel_rank(self.trainer)
        sampler = DataParallelShuffleSampler(num_rows, self.seed, rank=rank, world_size=world)
        if self._resume_state is not None:
            state = self._resume_state
            # rows of the epoch already trained on by all ranks (old checkpoints: one process)
            done = state.get("rows_in_epoch", state["batches_in_epoch"] * self.batch_size)
            sampler.resume_at(state["epoch"], done)
            self._resume_state = None
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data order (saved in checkpoints by Lightning)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # batches of this epoch already trained on (a checkpoint is written after its batch)
        _, world = data_parallel_rank(trainer)
        return {"epoch": trainer.current_epoch, "batches_in_epoch": progress.ready,
                "rows_in_epoch": progress.ready * self.batch_size * world, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and state_dict.get("seed") == self.seed:
            self._resume_state = dict(state_dict)


class TokenizedDataModule(ResumableOrder, pl.LightningDataModule):
    """Base of the lldiff DataModules: a resumable training order and the tokenizer facts
    the modules read (``vocab_size_real`` is linked to ``model.vocab_size`` by the CLI)."""

    @property
    def vocab_size_real(self) -> int:
        """The model's real vocabulary size V (tokenizer ids minus the mask); mask id = V."""
        return self.tokenizer.vocab_size

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_id
