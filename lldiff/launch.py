"""Launching a Lightning fit/validate/test: the ``LightningCLI`` behind ``lldiff fit`` and
every in-process training (sweeps, tuning studies, tests).

:func:`lightning_cli` parses a fit config (YAML files plus overrides) and runs it, or only
builds model, data and trainer (``run=False``). Around Lightning's own CLI it adds what a run
directory needs: the resolved ``config.yaml`` and the ``tokenizer.json`` beside the
checkpoints (:class:`SaveRunConfig`), checkpoint callbacks that write atomically, a refusal to
overwrite an existing run, ``--ckpt_path last`` that starts fresh when nothing is there to
resume, checkpoints read from local paths with ``weights_only=True`` only, and a refusal of a
checkpoint whose hyperparameters would silently swap the model the command line asked for.
The ``lldiff`` command (:mod:`lldiff.cli`) dispatches to it; nothing here imports the command.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lldiff.callbacks import RunCheckpoint, ValidateAtEnd, use_atomic_checkpoints, use_lldiff_console
from lldiff.objectives.common.base import LMBase
from lldiff.quiet import quiet_evaluation_advice
from lldiff.run_facts import RunFacts, check_resume, current_facts, last_checkpoint, own_log_version, saved_facts
from lldiff.run_lock import owning_run
from lldiff.strategies import check_strategy


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` (and the tokenizer as
    ``tokenizer.json``) in the run directory when fitting.

    A fresh fit refuses a directory that already holds a run's checkpoints (so nothing
    is overwritten by accident). ``--ckpt_path last`` resumes it and refreshes the config,
    but only once the checkpoint has been restored and accepted (``on_fit_start``): a
    refused resume leaves the run's ``config.yaml`` as it was.
    """

    _log_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir
        resuming = self.config.get("ckpt_path") is not None  # trainer.ckpt_path is set only after setup
        if not resuming:
            refuse_existing_run(log_dir)
            self._write_run_files(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self.config.get("ckpt_path") is not None:
            self._write_run_files(trainer, pl_module, "fit")

    def _write_run_files(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._log_dir = log_dir = trainer.log_dir  # on every rank (it broadcasts)
        super().setup(trainer, pl_module, stage)  # save_to_log_dir=False: on rank 0 it calls save_config
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if trainer.is_global_zero and log_dir is not None and tokenizer is not None:
            tokenizer.save(os.path.join(log_dir, "tokenizer.json"))  # the run dir is self-contained
            template = getattr(trainer.datamodule, "template", None)
            if template is not None:  # the SFT chat template as resolved (also one read beside the tokenizer)
                from lldiff.atomic import write_text
                from lldiff.data.chat import SAVED_TEMPLATE_FILE

                write_text(os.path.join(log_dir, SAVED_TEMPLATE_FILE),
                           json.dumps({"template": template.to_dict()}, indent=2) + "\n")

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """``config.yaml`` as Lightning writes it, but by replace: a link standing there is
        replaced, never written through; a link standing for the logger's ``hparams.yaml`` is
        removed, so that the logger writes the run's own file."""
        from lldiff.atomic import replacing

        if self._log_dir is None:
            return
        with replacing(os.path.join(self._log_dir, self.config_filename)) as tmp:
            self.parser.save(self.config, tmp, skip_none=False, overwrite=True, multifile=self.multifile)
        hparams = os.path.join(self._log_dir, "hparams.yaml")
        if os.path.islink(hparams):
            os.unlink(hparams)


class LLDiffCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.every_n_train_steps": 100,
            }
        )
        parser.link_arguments(
            "data", "model.init_args.vocab_size", compute_fn=_data_vocab_size, apply_on="instantiate"
        )
        parser.add_argument("--validate_at_end", type=bool, default=True,
                            help="fit: validate the final weights unless the last step just did (default true)")

    def before_instantiate_classes(self) -> None:
        """Refuse an unknown or unsupported ``trainer.strategy`` before anything is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_strategy(trainer.get("strategy"), trainer.get("accelerator", "auto"))
        if self.subcommand in ("validate", "test"):  # not into the training run's curves and HParams
            own_log_version(trainer.get("logger"), self.subcommand)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``/``--weights_only`` before anything is read, then let Lightning
        read the checkpoint's hyperparameters, refusing any that would silently replace the
        model the command line asked for (another objective, another size, ...)."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        check_checkpoint_source(config.get("ckpt_path"), config.get("weights_only"))
        asked = _plain(config.get("model"))
        super()._parse_ckpt_path()
        subcommand = self.config.subcommand
        loaded = _plain(self.config[subcommand].get("model"))
        for key, value in refuse_replaced_model(config.get("ckpt_path"), asked, loaded).items():
            self.config[subcommand]["model"]["init_args"][key] = value  # the command line's setting wins

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer.strategy)  # staged beside the target, then renamed
        use_lldiff_console(trainer)  # a step counter in the bar; one model line instead of a table of 0 FLOPs
        trainer.callbacks.append(RunFacts())  # max_steps and batch shape in checkpoints, checked on resume
        if self._get(self.config_init, "validate_at_end", True):
            trainer.callbacks.append(ValidateAtEnd())
        return trainer

    def before_fit(self) -> None:
        """Refusals that need no fit, made before Lightning opens the run's event file: a fresh
        fit into an existing run, a resume with another schedule length or batch shape."""
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path is None:
            refuse_existing_run(self.trainer.log_dir)
            return
        if ckpt_path == "last":
            directory = _checkpoint_dir(self.trainer)
            ckpt_path = last_checkpoint([os.path.join(directory, name) for name in _last_checkpoints(self.trainer)])
        if ckpt_path is not None and os.path.exists(ckpt_path):
            from lldiff.checkpoint import read_checkpoint_meta

            saved = saved_facts(read_checkpoint_meta(ckpt_path))
            check_resume(str(ckpt_path), saved, current_facts(self.trainer, self.datamodule))

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True  # Lightning would pick False for remote paths
        if kwargs.get("ckpt_path") == "last" and not _last_checkpoints(self.trainer):
            where = os.path.join(self.trainer.log_dir or ".", "checkpoints")
            print(f"lldiff {subcommand}: no checkpoint to resume in {where}; starting a new run", file=sys.stderr)
            kwargs["ckpt_path"] = None
            self.config_init[subcommand]["ckpt_path"] = None
            for callback in self.trainer.callbacks:
                if isinstance(callback, SaveRunConfig):
                    callback.config["ckpt_path"] = None  # a fresh run: write its config at setup
        check_sharded_sources(self.trainer, kwargs.get("ckpt_path"))
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a fit that fails before its first checkpoint removes the run directory it
        created (no half-made run is left to be mistaken for one, or to block a rerun)."""
        log_dir = self.trainer.log_dir if subcommand == "fit" else None
        existed = log_dir is not None and os.path.exists(log_dir)
        events = set(_event_files(log_dir)) if existed else set()
        with owning_run(self.trainer, log_dir):  # one process (job) at a time per run directory
            try:
                with contextlib.nullcontext() if subcommand == "fit" else quiet_evaluation_advice():
                    super()._run_subcommand(subcommand)
            except BaseException:
                if log_dir is not None and not existed and self.trainer.is_global_zero:
                    remove_unfinished_run(log_dir)
                started = any(getattr(c, "training_started", False) for c in self.trainer.callbacks)
                if existed and not started and self.trainer.is_global_zero:  # refused before a step: write nothing
                    for path in set(_event_files(log_dir)) - events:
                        os.remove(path)
                raise


def refuse_existing_run(log_dir: str | None) -> None:
    """A fresh fit refuses a directory that already holds a run's last checkpoint."""
    last = os.path.join(log_dir, "checkpoints", "last.ckpt") if log_dir is not None else None
    if last is not None and os.path.exists(last):
        raise ValueError(
            f"run directory {log_dir!r} already holds a run ({last}). Resume it with "
            "`--ckpt_path last`, or start a new run under another name with "
            "`--trainer.logger.init_args.name NAME`."
        )


def _event_files(log_dir: str | None) -> list[str]:
    """The TensorBoard event files directly in ``log_dir``."""
    import glob

    return glob.glob(os.path.join(glob.escape(log_dir), "events.out.tfevents.*")) if log_dir else []


def _data_vocab_size(datamodule: LightningDataModule) -> int:
    return datamodule.vocab_size_real


def check_checkpoint_source(ckpt_path: Any, weights_only: Any) -> None:
    """Checkpoints are read from local paths with ``weights_only=True`` only: an unpickled
    object from a file (or a URL) can run any code."""
    if weights_only is False:
        raise ValueError("--weights_only false is refused: lldiff reads checkpoints with weights_only=True only "
                         "(a pickled object can run code); its own checkpoints need nothing else")
    if isinstance(ckpt_path, str) and "://" in ckpt_path and not ckpt_path.startswith("file://"):
        raise ValueError(f"--ckpt_path {ckpt_path!r}: lldiff reads checkpoints from local paths only "
                         "(Lightning would unpickle a remote file with weights_only=False); download it first")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything inside one) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


MODEL_KEYS_FROM_DATA = {"vocab_size"}  # linked from the data at instantiation, absent from a parsed config
MODEL_SHAPE_KEYS = ("size", "model_overrides", "block_size")
"""What the weights are (size, shape overrides, and the objective's own parameters, the keys of
``registry.Objective.module_args()``: another block size is another model); the rest are
settings of this command."""


def refuse_replaced_model(ckpt_path: Any, asked: Any, loaded: Any) -> dict[str, Any]:
    """Lightning replaces the config's model section by the checkpoint's hyperparameters.
    Refuse when that changes the model the command line asked for (its class, size, shape
    overrides or block size); return the other settings the command line gave (learning rate,
    evaluation draws, ...), which must win over the checkpoint's rather than vanish."""
    if not isinstance(asked, dict) or not isinstance(loaded, dict) or asked == loaded:
        return {}
    if _named_class(asked.get("class_path")) is not _named_class(loaded.get("class_path")):
        raise ValueError(f"--ckpt_path {ckpt_path} holds a {loaded.get('class_path')} model but the config asks for "
                         f"{asked.get('class_path')}; use the config the run was made with (its config.yaml)")
    before, after = asked.get("init_args") or {}, loaded.get("init_args") or {}
    differs = [k for k in MODEL_SHAPE_KEYS if before.get(k) is not None and before.get(k) != after.get(k)]
    if differs:
        pairs = ", ".join(f"{k}={before.get(k)!r} (checkpoint: {after.get(k)!r})" for k in differs)
        raise ValueError(f"--ckpt_path {ckpt_path} holds another model than asked: {pairs}; "
                         "use the run's own model settings, or start a new run without --ckpt_path")
    return {k: v for k, v in before.items()
            if k not in MODEL_KEYS_FROM_DATA and k not in MODEL_SHAPE_KEYS and v is not None and after.get(k) != v}


def _named_class(path: Any) -> Any:
    """The class a config's class path names (an old path, e.g. ``lldiff.modules.MaskedDiffusionLM``,
    names today's class), or the path itself when it names none."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def check_sharded_sources(trainer: Trainer, ckpt_path: Any) -> None:
    """A sharded directory given as ``--ckpt_path`` (or found as ``last``) is checked before
    any strategy reads it (:func:`lldiff.checkpoint_io.check_sharded_metadata`): Lightning's own
    DCP reader unpickles its index and byte entries with ``weights_only=False``."""
    from lldiff.checkpoint_io import check_sharded_metadata

    if ckpt_path == "last":
        dirpath = _checkpoint_dir(trainer)
        paths = [os.path.join(dirpath, name) for name in _last_checkpoints(trainer)]
    else:
        paths = [ckpt_path] if isinstance(ckpt_path, (str, os.PathLike)) else []
    for path in paths:
        if os.path.isfile(os.path.join(path, ".metadata")):
            check_sharded_metadata(path)


def _checkpoint_dir(trainer: Trainer) -> str:
    callback = trainer.checkpoint_callback
    return (callback.dirpath if callback is not None else None) or os.path.join(trainer.log_dir or ".", "checkpoints")


def _last_checkpoints(trainer: Trainer) -> list[str]:
    if trainer.checkpoint_callback is None:
        return []
    dirpath = _checkpoint_dir(trainer)
    if not os.path.isdir(dirpath):
        return []
    return [name for name in os.listdir(dirpath) if name.startswith("last") and name.endswith(".ckpt")]


def remove_unfinished_run(log_dir: str) -> None:
    """Delete a run directory this fit created if it holds no checkpoint."""
    import shutil

    checkpoints = os.path.join(log_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        return
    shutil.rmtree(log_dir, ignore_errors=True)


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "lldiff", "version": "", "default_hp_metric": False},
    },
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
}


def lightning_cli(args: list[str] | None = None, *, run: bool = True) -> LLDiffCLI:
    """LightningCLI over ``args`` (None: the process's own command line).

    ``run=False`` parses and instantiates model, data and trainer without running a
    subcommand (``args`` then carry no ``fit``): the caller may add callbacks to
    ``cli.trainer`` and call ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)``.
    """
    with warnings.catch_warnings():
        # args given in-process (sweeps, tests) while sys.argv holds the outer command
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        return _cli(args, run)


def resume_args(config: dict[str, Any]) -> list[str]:
    """``["--ckpt_path", "last"]`` when the run that ``config`` (a fit config dict with a
    TensorBoardLogger) describes has a last checkpoint; else nothing (a fresh run)."""
    logger = config["trainer"]["logger"]["init_args"]
    run_dir = os.path.join(logger["save_dir"], logger["name"], str(logger.get("version") or ""))
    return ["--ckpt_path", "last"] if os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt")) else []


def _cli(args: list[str] | None, run: bool = True) -> LLDiffCLI:
    return LLDiffCLI(
        LMBase,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # SaveRunConfig writes it by replace
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
        parser_kwargs={"description": "lldiff: masked diffusion vs autoregressive LMs"},
    )
