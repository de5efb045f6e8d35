"""The ``lldiff`` command: dispatch to a subcommand, an overview, one-line errors.

``fit``/``validate``/``test`` go to the Lightning launcher (:mod:`lldiff.launch`); ``sweep``,
``generate``, ``eval``, ``chat`` and ``tune`` to their own modules, imported when called.
Nothing imports this module back: code that trains in-process uses :mod:`lldiff.launch`.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from lldiff import objectives as registry
from lldiff.config import SIZES

LIGHTNING_COMMANDS = {
    "fit": "train a model (AR, MDM, BD3) from a YAML config: lldiff fit --config configs/mdm-tiny.yaml",
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


def _import(argv: list[str]) -> None:
    from lldiff.convert import import_main

    import_main(argv)


def _export(argv: list[str]) -> None:
    from lldiff.convert import export_main

    export_main(argv)


OTHER_COMMANDS = {
    "sweep": ("scaling sweeps over objectives (ar, mdm, bd3-B): lldiff sweep run|plan|analyze (lldiff sweep --help)", _sweep),
    "generate": ("sample from a checkpoint (any objective): lldiff generate --ckpt X --prompt TEXT", _generate),
    "eval": ("zero-shot multiple choice by likelihood: lldiff eval --ckpt X --task T", _eval),
    "chat": ("talk to a fine-tuned checkpoint (multi-turn): lldiff chat --ckpt X [--message TEXT]", _chat),
    "tune": ("Optuna hyperparameter search: lldiff tune run|best (lldiff tune --help)", _tune),
    "import": ("a LLaDA checkpoint directory as an lldiff run: lldiff import llada HF_DIR --out RUN_DIR", _import),
    "export": ("a checkpoint as a Hugging Face directory (AR: Llama, MDM/BD3: LLaDA): lldiff export CKPT --to hf OUT",
               _export),
}


def _objective_lines() -> list[str]:
    """One line per registry family: its name in sweep specs, its folder and what it is."""
    lines = []
    for name, family in registry.families().items():
        spelled = f"{name}-B" if family.parameter else name  # a family with a parameter (bd3-4, bd3-16)
        lines.append(f"  {spelled:<6} lldiff/objectives/{name}/: {family.description}")
    return lines


def _strategy_presets() -> list[str]:
    from lldiff.strategy_names import PRESETS  # the names only: registering them imports Lightning

    return list(PRESETS)


def overview() -> str:
    lines = ["usage: lldiff COMMAND [options]", "", "Commands:"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<10} {text}" for name, (text, _) in OTHER_COMMANDS.items()]
    lines += [
        "",
        "`lldiff COMMAND --help` lists every option of a command (model, data, trainer,",
        "checkpoint); `lldiff fit --config X.yaml --print_config` prints a full resolved config.",
        "",
        "Objectives (model.class_path; bd3-B sets model.init_args.block_size: B):",
        *_objective_lines(),
        "Data classes (data.class_path): lldiff.data.PretrainDataModule, lldiff.data.SFTDataModule",
        "Model sizes (model.init_args.size): " + ", ".join(SIZES),
        "Strategies (trainer.strategy): " + ", ".join(_strategy_presets()) + " (overlays: configs/strategies/)",
    ]
    return "\n".join(lines)


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
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
    except OSError as error:  # a full disk or quota (a checkpoint names its path and the space left): one line
        if debug or error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        command = argv[0] if argv else ""
        print(f"lldiff {command}: error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


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
        from lldiff.launch import lightning_cli  # Lightning only for the commands that train or validate

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
