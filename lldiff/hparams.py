"""TensorBoard's HParams table of a run: its hyperparameters and the metric columns to show."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as tb_hparams

METRIC_COLUMNS = ["val/nll_per_token", "val/bpb"]


def register_hparams_metrics(logger: TensorBoardLogger, params: dict[str, Any], metrics: list[str]) -> None:
    """Fill TensorBoard's HParams table: hyperparameters plus the metric columns to show.

    Unlike ``TensorBoardLogger.log_hyperparams(params, metrics)`` this writes no fake
    scalar at step 0; the columns pick up the real ``val/*`` scalars as they are logged.
    """
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    writer = logger.experiment._get_file_writer()
    for summary in tb_hparams(flat, {name: 0.0 for name in metrics}):
        writer.add_summary(summary)


def write_hparams_table(module: Any) -> None:
    """The module's hyperparameters, its objective, its non-embedding parameter count and its
    data's settings, in every TensorBoard logger of rank 0."""
    hparams = {**module.hparams, "objective": module.objective.name, "n_nonemb": module.config.non_embedding_params()}
    datamodule = getattr(module.trainer, "datamodule", None)
    if datamodule is not None:
        hparams.update({f"data.{k}": v for k, v in datamodule.hparams.items()})
    for logger in module.loggers if module.trainer.is_global_zero else ():  # other ranks have no writer
        if isinstance(logger, TensorBoardLogger):
            register_hparams_metrics(logger, hparams, METRIC_COLUMNS)
