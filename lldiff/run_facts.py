"""What a resumed run must keep, checked before anything is written; where a standalone
evaluation logs.

A checkpoint records the run's schedule length and batch shape (:class:`RunFacts`, a
callback the CLI installs): ``trainer.max_steps`` (the warmup + cosine schedule ends there, so
another value re-stretches it from the resumed step: lr jumps), the global batch (rows per
process x data-parallel processes: 2 processes x 8 rows resume as 1 x 16) and ``seq_len``. A
resume that changes any of them is refused naming both values (:func:`check_resume`), before
the fit starts, so a refused resume leaves the run as it was. Checkpoints written before these
facts were recorded are checked on what they hold (batch and ``seq_len`` from the data
hyperparameters).

``lldiff validate`` / ``test`` of a run log to ``RUN/validate/<time>`` (``RUN/test/<time>``),
not into the training curves (:func:`own_log_version`).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

import lightning as L

from lldiff.data.resumable import data_parallel_rank

STATE_KEY = "RunFacts"


def current_facts(trainer: L.Trainer, datamodule: Any = None) -> dict[str, Any]:
    """``max_steps``, per-process ``batch_size``, data-parallel ``world_size`` and ``seq_len``
    of this run (None where the data module, by default the trainer's, has no such attribute)."""
    datamodule = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    return {
        "max_steps": trainer.max_steps,
        "batch_size": getattr(datamodule, "batch_size", None),
        "world_size": _data_parallel_size(trainer),
        "seq_len": getattr(datamodule, "seq_len", None),
    }


def _data_parallel_size(trainer: L.Trainer) -> int:
    """The data-parallel processes; before the processes start (the CLI's early check) an
    FSDP2 strategy has no device mesh yet: then the size it will take, else the world size."""
    try:
        return data_parallel_rank(trainer)[1]
    except RuntimeError:
        size = getattr(trainer.strategy, "_data_parallel_size", None)
        return size if isinstance(size, int) else trainer.world_size


def saved_facts(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The facts a checkpoint holds; for one written before :class:`RunFacts`, what its data
    hyperparameters and data position say (``max_steps`` and the world size then unknown:
    the global batch is ``rows_in_epoch / batches_in_epoch`` when a batch of the epoch ran)."""
    facts = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    if facts:
        return dict(facts)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    facts = {"max_steps": None, "batch_size": data.get("batch_size"), "world_size": None, "seq_len": data.get("seq_len")}
    for state in checkpoint.values():  # the data module's state (its class name is the key)
        if isinstance(state, dict) and state.get("batches_in_epoch") and state.get("rows_in_epoch") and facts["batch_size"]:
            global_batch, rest = divmod(state["rows_in_epoch"], state["batches_in_epoch"])
            if not rest and global_batch % facts["batch_size"] == 0:
                facts["world_size"] = global_batch // facts["batch_size"]
    return facts


def check_resume(ckpt_path: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse resuming ``ckpt_path`` (whose facts are ``saved``) with another ``max_steps``,
    global batch or ``seq_len`` (``now``); facts one side does not know are not compared."""
    def known(key: str) -> bool:
        return saved.get(key) is not None and now.get(key) is not None

    problems = []
    if known("max_steps") and saved["max_steps"] != now["max_steps"]:
        problems.append(f"trainer.max_steps={now['max_steps']} (the run's: {saved['max_steps']}; its warmup + cosine "
                        "schedule ends there, another value would re-stretch it from the resumed step)")
    if known("batch_size"):
        if known("world_size"):
            rows, theirs = now["batch_size"] * now["world_size"], saved["batch_size"] * saved["world_size"]
            if rows != theirs:
                problems.append(f"data.batch_size={now['batch_size']} x {now['world_size']} process(es) = {rows} rows "
                                f"per step (the run's: {saved['batch_size']} x {saved['world_size']} = {theirs})")
        elif saved["batch_size"] != now["batch_size"] and saved.get("world_size") is None and now["world_size"] == 1:
            problems.append(f"data.batch_size={now['batch_size']} (the run's: {saved['batch_size']})")
    if known("seq_len") and saved["seq_len"] != now["seq_len"]:
        problems.append(f"data.seq_len={now['seq_len']} (the run's: {saved['seq_len']})")
    if problems:
        raise ValueError(f"--ckpt_path {ckpt_path}: refused to resume with {'; '.join(problems)}. A resumed run keeps "
                         "its schedule and batches to stay exact: resume with the run's own settings (its "
                         "config.yaml), or start a new run under another name to train differently")


class RunFacts(L.Callback):
    """Saves :func:`current_facts` in every checkpoint and refuses a resume that changes them
    (for fits started without the CLI's early check, e.g. ``lightning_cli(run=False)``).
    ``training_started`` says whether the fit reached its first step (a fit refused before
    leaves no event file in the run: :class:`lldiff.launch.LLDiffCLI`)."""

    training_started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training_started = True

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        return {} if trainer is None else current_facts(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            check_resume(str(trainer.ckpt_path), saved_facts(checkpoint), current_facts(trainer))


def last_checkpoint(paths: list[str]) -> str | None:
    """The newest of ``paths`` (Lightning's choice for ``--ckpt_path last``)."""
    existing = [p for p in paths if os.path.exists(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def own_log_version(logger: Any, subcommand: str, now: datetime | None = None) -> None:
    """A TensorBoard logger config (``class_path`` / ``init_args``) of ``validate`` / ``test``
    whose ``version`` names a run directory (a string: ``""`` is ``save_dir/name`` itself) logs
    to ``<version>/<subcommand>/<time>`` inside it instead: its point at step 0 and its
    hyperparameters stay out of the training run's curves and HParams. Edited in place."""
    if not isinstance(logger, dict) and not hasattr(logger, "init_args"):
        return
    get = logger.get if isinstance(logger, dict) else lambda key, default=None: getattr(logger, key, default)
    if not str(get("class_path", "")).endswith("TensorBoardLogger"):
        return
    init_args = get("init_args")
    version = init_args.get("version") if isinstance(init_args, dict) else getattr(init_args, "version", None)
    if not isinstance(version, str):
        return  # None: Lightning numbers a new version directory, already apart from the run
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    value = os.path.join(version, subcommand, stamp)
    if isinstance(init_args, dict):
        init_args["version"] = value
    else:
        init_args.version = value
