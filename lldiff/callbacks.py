"""Lightning callbacks used by the CLI."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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
