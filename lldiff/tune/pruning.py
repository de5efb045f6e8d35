"""Pruning keyed on the global step.

``optuna_integration.PyTorchLightningPruningCallback`` reports once per *epoch* (at
``on_validation_end`` with ``step=trainer.current_epoch``): a step-based run that lives
within one epoch reports every validation at step 0, and Optuna keeps only the first
report of a step, so it never prunes. This callback reports ``val/nll_per_token`` with
``step=trainer.global_step`` after every validation during fit, so the pruner compares
trials at the same number of optimizer steps (the same points for every trial of a study,
whose validation runs every ``max_steps // evals`` steps), and raises
``optuna.TrialPruned`` when the pruner says so.
"""

from __future__ import annotations

import math

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

MONITOR = "val/nll_per_token"


class StepPruningCallback(Callback):
    """Report ``monitor`` to ``trial`` at ``trainer.global_step``; prune when told.

    The sanity-check validation (before step 1) is not reported. A validation outside fit
    (``trainer.validate``) is reported but never prunes: the trial has finished training.
    ``last_step`` and ``last_value`` hold the latest report. On pruning the trial's user
    attributes ``pruned_at_step`` and ``pruned_at_epoch`` record where.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = MONITOR) -> None:
        self.trial = trial
        self.monitor = monitor
        self.last_step: int | None = None
        self.last_value: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(f"pruning monitors {self.monitor!r}, which validation did not log; "
                               f"logged: {sorted(trainer.callback_metrics)}")
        step = trainer.global_step
        value = float(value)
        if step != self.last_step:  # Optuna keeps the first report of a step and warns on repeats
            self.trial.report(value if math.isfinite(value) else math.inf, step)
        self.last_step, self.last_value = step, value
        if trainer.state.fn != "fit":
            return
        if not math.isfinite(value) or self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", step)
            self.trial.set_user_attr("pruned_at_epoch", trainer.current_epoch)
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at step {step} ({self.monitor}={value:.4g})")
