"""The TensorBoard HParams table of a fit: what a scaling study compares, first.

TensorBoard orders the table's columns by name (those that differ between the shown runs
first), so the columns a study compares carry a numbered name that sorts before every other
hyperparameter: ``0 run`` (the run's full logger path: a sweep's ``mdm/tiny-1M/C1e+11``, a
trial's ``0003``), ``1 objective``, ``2 size``, ``3 n_nonemb``, ``4 lr``, ``5 max_steps``,
``6 tokens`` (planned: steps x rows per step x sequence length), ``7 seed``; then the model's
other init args and the data's (``data.*``). jsonargparse's bookkeeping (``_class_path``,
``_instantiator``) is left out. The metric columns are the validation metrics; the table is
written without a fake scalar at step 0 (the columns pick up the real ``val/*`` scalars).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as tb_hparams

METRICS = ("val/nll_per_token", "val/bpb")
HEADLINE = ("run", "objective", "size", "n_nonemb", "lr", "max_steps", "tokens", "seed")
"""The columns a scaling study compares, in this order (their names get a sorting number)."""


def headline_name(key: str) -> str:
    """``"size"`` -> ``"2 size"``: the name under which a headline column sorts first."""
    return f"{HEADLINE.index(key)} {key}"


def hparams_table(module: Any, trainer: Any, run: str | None = None) -> dict[str, Any]:
    """The HParams row of ``module``'s fit: the headline columns (numbered names), then the
    model's other init args and the data's, jsonargparse's ``_*`` keys dropped."""
    hparams = {k: v for k, v in dict(module.hparams).items() if not str(k).startswith("_")}
    datamodule = getattr(trainer, "datamodule", None)
    data = {k: v for k, v in dict(getattr(datamodule, "hparams", None) or {}).items() if not str(k).startswith("_")}
    seq_len = getattr(datamodule, "seq_len", None) or getattr(datamodule, "max_length", None)
    batch = getattr(datamodule, "batch_size", None)
    headline: dict[str, Any] = {
        "run": run,
        "objective": module.objective.name if hasattr(module, "objective") else None,
        "size": hparams.pop("size", None),
        "n_nonemb": module.config.non_embedding_params() if hasattr(module, "config") else None,
        "lr": hparams.pop("lr", None),
        "max_steps": trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
        "seed": _int_or_none(os.environ.get("PL_GLOBAL_SEED")),  # seed_everything's
    }
    if headline["max_steps"] and isinstance(seq_len, int) and isinstance(batch, int):
        rows = batch * trainer.world_size * trainer.accumulate_grad_batches
        headline["tokens"] = headline["max_steps"] * rows * seq_len
    table = {headline_name(k): headline[k] for k in HEADLINE if headline.get(k) is not None}
    table.update(sorted(hparams.items()))
    table.update(sorted((f"data.{k}", v) for k, v in data.items()))
    return table


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def run_name(logger: TensorBoardLogger) -> str:
    """The run's path under the logger's save_dir: ``name/version`` (no empty version)."""
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return "/".join(part for part in (str(logger.name or ""), version) if part)


def register_hparams_metrics(logger: TensorBoardLogger, params: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> None:
    """Fill TensorBoard's HParams table: hyperparameters plus the metric columns to show.

    Unlike ``TensorBoardLogger.log_hyperparams(params, metrics)`` this writes no fake
    scalar at step 0; the columns pick up the real ``val/*`` scalars as they are logged.
    """
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    writer = logger.experiment._get_file_writer()
    for summary in tb_hparams(flat, {name: 0.0 for name in metrics}):
        writer.add_summary(summary)


def log_hparams_table(module: Any) -> None:
    """Write the HParams table of ``module``'s fit to each TensorBoard logger (rank 0 only:
    the other ranks have no writer)."""
    trainer = module.trainer
    if not trainer.is_global_zero:
        return
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            register_hparams_metrics(logger, hparams_table(module, trainer, run_name(logger)))
