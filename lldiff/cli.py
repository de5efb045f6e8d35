"""The ``lldiff`` command: LightningCLI for fit/validate/test, plus an overview."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lldiff.callbacks import RunCheckpoint
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
    is overwritten by accident); ``--ckpt_path last`` resumes it and refreshes the config.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir
        resuming = self.config.get("ckpt_path") is not None  # trainer.ckpt_path is set only after setup
        if log_dir is not None and not resuming:
            last = os.path.join(log_dir, "checkpoints", "last.ckpt")
            if os.path.exists(last):
                raise RuntimeError(
                    f"run directory {log_dir!r} already holds a run ({last}). Resume it with "
                    "`--ckpt_path last`, or start a new run under another name with "
                    "`--trainer.logger.init_args.name NAME`."
                )
        super().setup(trainer, pl_module, stage)
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


def _data_vocab_size(datamodule: LightningDataModule) -> int:
    return datamodule.vocab_size_real


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


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:  # `lldiff sweep plan | head`: the reader left; end quietly, as Python's docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1)


def _main(argv: list[str] | None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        lightning_cli(None if from_command_line else argv)
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
