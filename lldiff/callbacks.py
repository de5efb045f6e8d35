"""Lightning callbacks and plugins used by the CLI."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lldiff.checkpoint_io import is_local, write_file_atomically


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is also written when training ends.

    Stock Lightning writes ``last`` on its step/epoch triggers only, so a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would end with a stale
    ``last.ckpt``; evaluation and resumption expect the final weights there.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are staged beside the target and renamed
    (remote URLs keep Lightning's own path)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_file_atomically(path, lambda handle: torch.save(checkpoint, handle))


def use_atomic_checkpoints(strategy: Any) -> None:
    """Install :class:`AtomicCheckpointIO` on ``strategy`` unless the user chose another
    checkpoint IO (a plugin of their own is left alone)."""
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
