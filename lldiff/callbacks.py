"""Lightning callbacks and plugins used by the CLI."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer  # its ckpt_path is known when the states are restored, not yet here

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run directory that moved (copied to another machine, renamed) resumes like one
        that did not. Lightning restores the checkpoint paths only in the directory they were
        written in; elsewhere it forgets that ``last.ckpt`` is its own and writes the next one
        as ``last-v1.ckpt`` beside the stale one. When the checkpoint resumed lies in this
        callback's directory (the run moved with its checkpoints), paths inside the old
        checkpoint directory are read as the same files in this one; a checkpoint brought in
        from another run keeps Lightning's behaviour."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn != "fit":
            return  # validate / test write no checkpoint (and log elsewhere: lldiff.run_facts.own_log_version)
        stored = state_dict.get("dirpath")
        resumed = None if trainer is None else trainer.ckpt_path
        in_here = (self.dirpath is not None and isinstance(resumed, str)
                   and os.path.realpath(os.path.dirname(resumed)) == os.path.realpath(self.dirpath))
        if in_here and stored is not None and stored != self.dirpath:
            here = self.dirpath

            def moved(path: Any) -> Any:
                inside = isinstance(path, str) and path and os.path.dirname(path) == stored
                return os.path.join(here, os.path.basename(path)) if inside else path

            state_dict = {**state_dict, "dirpath": here,
                          "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
                          **{key: moved(state_dict[key]) for key in ("last_model_path", "best_model_path",
                                                                     "kth_best_model_path") if key in state_dict}}
        super().load_state_dict(state_dict)


class ValidateAtEnd(L.Callback):
    """Validate the final weights of every fit: the last step (``trainer.max_steps``) asks
    Lightning to stop, which validates once more unless that step was a validation step anyway
    (no double validation). A fit shorter than ``val_check_interval`` then still has its
    ``val/*`` point, so short runs compare in TensorBoard. ``lldiff fit --validate_at_end
    false`` turns it off."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


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


def _steps_metric(trainer: L.Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"step": "12/600", **metrics}`` for a run with a step budget (every lldiff fit)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.state.fn == "fit":
        return {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
    return metrics


class StepsRichProgressBar(RichProgressBar):
    """Lightning's rich bar for a run measured in steps: ``Epoch 0`` (not ``Epoch 0/-2``, which
    Lightning writes when ``max_epochs`` is unbounded) and ``step N/max_steps`` beside the loss."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = f"Epoch {current_epoch}"
            return f"{description:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _steps_metric(trainer, super().get_metrics(trainer, pl_module))


class StepsTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (without ``rich``) with ``step N/max_steps`` beside the loss."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _steps_metric(trainer, super().get_metrics(trainer, pl_module))


class ModelLine(ModelSummary):
    """One line instead of Lightning's model table, whose FLOPs column is 0 for every module
    (Lightning measures FLOPs only with an ``example_input_array``): the objective, size,
    parameters, non-embedding parameters N and the real training FLOPs per token
    (forward + backward matmuls, LM head and attention, at the data's sequence length:
    what ``trainer/flops_matmul`` counts)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_info(model_line(pl_module, getattr(trainer, "datamodule", None)))


def model_line(module: L.LightningModule, datamodule: Any = None) -> str:
    """``lldiff model: ...`` (see :class:`ModelLine`); a module that is no lldiff LM gets its
    class and parameter count only."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    counts = f"{total:,} parameters" + (f" ({trainable:,} trainable)" if trainable != total else "")
    config = getattr(module, "config", None)
    if config is None or not hasattr(module, "objective"):
        return f"lldiff model: {type(module).__name__}, {counts}"
    size = getattr(module, "hparams", {}).get("size", "")
    line = (f"lldiff model: {module.objective.name} {size} ({type(module).__name__}), {counts}, "
            f"N = {config.non_embedding_params():,} non-embedding")
    seq_len = getattr(datamodule, "seq_len", None)
    if isinstance(seq_len, int) and seq_len > 0:
        flops = module.objective.matmul_flops_per_token(config, seq_len)
        line += f", {flops:.4g} training FLOPs per token at length {seq_len} (6N = {6 * config.non_embedding_params():.4g})"
    return line


def use_lldiff_console(trainer: L.Trainer) -> None:
    """Replace the progress bar and the model summary Lightning added by default (not ones the
    user configured) by :class:`StepsRichProgressBar` / :class:`StepsTQDMProgressBar` and
    :class:`ModelLine`."""
    replacements = {RichProgressBar: StepsRichProgressBar, TQDMProgressBar: StepsTQDMProgressBar,
                    RichModelSummary: ModelLine, ModelSummary: ModelLine}
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in replacements:  # Lightning's defaults are built without arguments
            trainer.callbacks[i] = replacements[type(callback)]()
