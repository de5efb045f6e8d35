"""The ``lldiff`` command: LightningCLI for fit/validate/test, plus an overview."""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lldiff.callbacks import RunCheckpoint, use_atomic_checkpoints
from lldiff.config import SIZES
from lldiff.modules import LMBase
from lldiff.strategies import PRESETS as STRATEGY_PRESETS
from lldiff.strategies import check_strategy

LIGHTNING_COMMANDS = {
    "fit": "train a model (MDM or AR) from a YAML config: lldiff fit --config configs/mdm-tiny.yaml",
    "validate": "validation metrics of a checkpoint: lldiff validate --config X.yaml --ckpt_path PATH",
    "test": "test metrics of a checkpoint: lldiff test --config X.yaml --ckpt_path PATH",
}


def _sweep(argv: list[str]) -> None:
    from lldiff.sweep.cli import main as sweep_main

    sweep_main(argv)


def _generate(argv: list[str]) -> None:
    from lldiff.generate import main as generate_main

    generate_main(argv)


def _eval(argv: list[str]) -> None:
    from lldiff.evaluation.cli import main as eval_main

    eval_main(argv)


def _chat(argv: list[str]) -> None:
    from lldiff.chat import main as chat_main

    chat_main(argv)


def _tune(argv: list[str]) -> None:
    from lldiff.tune.cli import main as tune_main

    tune_main(argv)


OTHER_COMMANDS = {
    "sweep": ("MDM vs AR scaling sweeps: lldiff sweep run|plan|analyze (lldiff sweep --help)", _sweep),
    "generate": ("sample from an MDM or AR checkpoint: lldiff generate --ckpt X --prompt TEXT", _generate),
    "eval": ("zero-shot multiple choice by likelihood: lldiff eval --ckpt X --task T", _eval),
    "chat": ("talk to a fine-tuned checkpoint (multi-turn): lldiff chat --ckpt X [--message TEXT]", _chat),
    "tune": ("Optuna hyperparameter search: lldiff tune run|best (lldiff tune --help)", _tune),
}


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` (and the tokenizer as
    ``tokenizer.json``) in the run directory when fitting.

    A fresh fit refuses a directory that already holds a run's checkpoints (so nothing
    is overwritten by accident). ``--ckpt_path last`` resumes it and refreshes the config,
    but only once the checkpoint has been restored and accepted (``on_fit_start``): a
    refused resume leaves the run's ``config.yaml`` as it was.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir
        resuming = self.config.get("ckpt_path") is not None  # trainer.ckpt_path is set only after setup
        if log_dir is not None and not resuming:
            last = os.path.join(log_dir, "checkpoints", "last.ckpt")
            if os.path.exists(last):
                raise ValueError(
                    f"run directory {log_dir!r} already holds a run ({last}). Resume it with "
                    "`--ckpt_path last`, or start a new run under another name with "
                    "`--trainer.logger.init_args.name NAME`."
                )
        if not resuming:
            self._write_run_files(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self.config.get("ckpt_path") is not None:
            self._write_run_files(trainer, pl_module, "fit")

    def _write_run_files(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if trainer.is_global_zero and log_dir is not None and tokenizer is not None:
            tokenizer.save(os.path.join(log_dir, "tokenizer.json"))  # the run dir is self-contained


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

    def before_instantiate_classes(self) -> None:
        """Refuse an unknown or unsupported ``trainer.strategy`` before anything is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_strategy(trainer.get("strategy"), trainer.get("accelerator", "auto"))

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
        return trainer

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
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a fit that fails before its first checkpoint removes the run directory it
        created (no half-made run is left to be mistaken for one, or to block a rerun)."""
        log_dir = self.trainer.log_dir if subcommand == "fit" else None
        existed = log_dir is not None and os.path.exists(log_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if log_dir is not None and not existed and self.trainer.is_global_zero:
                remove_unfinished_run(log_dir)
            raise


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
MODEL_SHAPE_KEYS = ("size", "model_overrides")  # what the weights are; the rest are settings of this command


def refuse_replaced_model(ckpt_path: Any, asked: Any, loaded: Any) -> dict[str, Any]:
    """Lightning replaces the config's model section by the checkpoint's hyperparameters.
    Refuse when that changes the model the command line asked for (its class, size or
    shape overrides); return the other settings the command line gave (learning rate,
    evaluation draws, ...), which must win over the checkpoint's rather than vanish."""
    if not isinstance(asked, dict) or not isinstance(loaded, dict) or asked == loaded:
        return {}
    if asked.get("class_path") != loaded.get("class_path"):
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


def _last_checkpoints(trainer: Trainer) -> list[str]:
    callback = trainer.checkpoint_callback
    if callback is None:
        return []
    dirpath = callback.dirpath or os.path.join(trainer.log_dir or ".", "checkpoints")
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
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
        parser_kwargs={"description": "lldiff: masked diffusion vs autoregressive LMs"},
    )


def overview() -> str:
    lines = ["usage: lldiff COMMAND [options]", "", "Commands:"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<10} {text}" for name, (text, _) in OTHER_COMMANDS.items()]
    lines += [
        "",
        "`lldiff COMMAND --help` lists every option of a command (model, data, trainer,",
        "checkpoint); `lldiff fit --config X.yaml --print_config` prints a full resolved config.",
        "",
        "Model classes (model.class_path): lldiff.modules.MaskedDiffusionLM, lldiff.modules.AutoregressiveLM",
        "  fine-tuning (SFT): lldiff.finetune.MaskedDiffusionSFT, lldiff.finetune.AutoregressiveSFT",
        "Data classes (data.class_path): lldiff.data.PretrainDataModule, lldiff.data.SFTDataModule",
        "Model sizes (model.init_args.size): " + ", ".join(SIZES),
        "Strategies (trainer.strategy): " + ", ".join(STRATEGY_PRESETS) + " (overlays: configs/strategies/)",
    ]
    return "\n".join(lines)


USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
"""Exceptions that report a mistake in the input (a value, a path): one line, exit 2. Anything
else is a bug and keeps its traceback; ``--debug`` shows the traceback of both."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        _main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        command = argv[0] if argv else ""
        print(f"lldiff {command}: error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `lldiff sweep plan | head`: the reader left; end quietly, as Python's docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1)


def one_line(error: BaseException) -> str:
    """An exception's message on one line. jsonargparse wraps a constructor's error in a
    report of every type it tried ("Does not validate against any of the Union subtypes ...
    Errors: - <ours> - Expected a <class 'NoneType'>"); the constructor's own message is kept."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip() or type(error).__name__
    reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith("Expected a ") and "Not a valid subclass" not in r]
    if text.startswith("Does not validate against any of the Union subtypes") and reasons:
        text = reasons[0]
    text = re.sub(r"^Call to compute_fn of link .* failed: ", "", text, flags=re.S)
    return " ".join(text.split())


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        lightning_cli(argv)
        return
    if command in OTHER_COMMANDS:
        OTHER_COMMANDS[command][1](argv[1:])
        return
    allowed = ", ".join([*LIGHTNING_COMMANDS, *OTHER_COMMANDS])
    print(f"lldiff: unknown command {command!r}; allowed: {allowed}\n", file=sys.stderr)
    print(overview(), file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
